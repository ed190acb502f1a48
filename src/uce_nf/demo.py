"""Synthetic UCE model files in the official layout (the demo data sets: demo_data.py).

Real UCE weights and ESM2 gene tokens cannot be obtained offline (and their licence is
unconfirmed), so tests, the demo profile and CI use *synthetic* files that have exactly the
official formats, file names and state-dict keys, filled with seeded random values:

``model_files/``
    ``species_chrom.csv``            columns ``species,gene_symbol,chromosome,start``
    ``species_offsets.pkl``          pickled ``{species: first token row}``
    ``all_tokens.torch``             one float32 tensor (the token table)
    ``<checkpoint_name>``            plain ``torch.save``-d state dict of ``TransformerModel``
    ``protein_embeddings/*.pt``      eight ``{symbol: float32 tensor[token_dim]}`` dicts

Decisions (documented here because nothing upstream fixes them)
---------------------------------------------------------------
Protein-embedding dicts
    * Keys keep the original case of the source table (``C9orf78``; mouse ``Cd74``), so keys
      differ in case from the csv. Dict order is a seeded permutation of the species' genes,
      deliberately *different* from the csv order, so that an implementation deriving token
      ids from the csv order (instead of dict order) fails the parity tests.
    * Human edge case: ``Cd74`` is appended after ``CD74`` (collision after upper-casing).
      The reference upper-cases keys: the token keeps the position of ``CD74`` and the value
      of ``Cd74`` (``COLLISION_KEYS``).
Token table
    Rows 0 (PAD, zeros), 1-3 (seeded normal), then one block per species in alphabetical
    order (upper-cased, de-duplicated keys in dict order, value = last one), then one seeded
    normal row per chromosome category, categories = ``pd.Categorical(species + "_" +
    chromosome)`` over the whole csv. ``chrom_token_offset = rows - n_categories``. The
    checkpoint's ``pe_embedding.weight`` is the same table. With ``full_table=True`` the
    official shapes are produced instead: the token file has 143,574 rows (random filler
    after the species blocks) and the checkpoint table 145,469 rows, whose chromosome rows
    (from 143,574 on) are *not* what the reference's ``torch.manual_seed(23)`` filler gives,
    so a test can tell which table was used.
Checkpoint weights ("discriminating", uce-reference §15)
    PyTorch default initialisation makes every cell look alike. Instead (``WEIGHT_SCALES``):
    a small, jittered encoder LayerNorm gain (0.3 x (1 + 0.2 N)), a larger attention output
    projection (std 4/sqrt(d_model)), query/key/value projections with std 2/sqrt(d_model),
    jittered LayerNorm weights everywhere (1 + 0.2 N), small random biases (std 0.05). Measured
    on 12 pbmc cells with the reference model (tests/test_demo.py), as 1 - cosine: boolean
    instead of +1 float pad mask up to 3e-4, reversed chromosome order 6e-2 (median), another
    random stream 4e-2 (median), fp32 vs fp64 1e-12; cells' pairwise cosine goes down to ~0.5.
    The ``binary_decoder.*`` tensors (unused at inference, large because of the hard-coded 1280
    input) are all zeros so they compress to nothing in git. ``pos_encoder.pe`` holds the
    sinusoidal table (max_len 1536). The model is meant to be loaded with
    ``nhead = max(1, d_model // 64)`` (head dim 64 as in the official models).
Gene tables and demo data: see demo_data.py. Everything is a deterministic function of the
arguments (seeded ``numpy`` Generators and ``torch.Generator``s).
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import click
import numpy as np
import pandas as pd
import torch

from .demo_data import SPECIES, build_gene_table, seeded_rng, write_demo_data, xclone_wheel
from .io import UserError, handle_errors
from .model_files import OFFICIAL_TABLE_ROWS, OFFICIAL_TOKEN_ROWS, PROTEIN_EMBEDDING_FILES

__all__ = [
    "SPECIES",
    "PROTEIN_EMBEDDING_FILES",
    "OFFICIAL_TOKEN_ROWS",
    "OFFICIAL_TABLE_ROWS",
    "OFFICIAL_N_CHROM_TOKENS",
    "xclone_wheel",
    "checkpoint_shapes",
    "write_model_files",
    "make_demo_command",
]

OFFICIAL_N_CHROM_TOKENS = OFFICIAL_TABLE_ROWS - OFFICIAL_TOKEN_ROWS  # 1,895
POSITIONAL_MAX_LEN = 1536
N_SPECIAL_TOKENS = 4  # PAD, chrom-left, chrom-right, CLS

#: Human protein-embedding keys that collide after upper-casing (second one appended last).
COLLISION_KEYS = ("CD74", "Cd74")


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _torch_gen(seed: int, *stream: int) -> torch.Generator:
    # one 63-bit torch seed per (seed, stream...) derived through numpy's SeedSequence
    ss = np.random.SeedSequence([int(seed), *stream])
    g = torch.Generator()
    g.manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
    return g


def _torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# checkpoint
# --------------------------------------------------------------------------------------------
def checkpoint_shapes(*, nlayers: int, d_model: int, d_hid: int, output_dim: int, token_dim: int,
                      table_rows: int) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of the reference ``TransformerModel`` (uce-reference §3.2),
    in module registration order, plus ``pe_embedding.weight``."""
    s: dict[str, tuple[int, ...]] = {"pos_encoder.pe": (POSITIONAL_MAX_LEN, 1, d_model)}

    def linear(name, n_in, n_out):
        s[f"{name}.weight"] = (n_out, n_in)
        s[f"{name}.bias"] = (n_out,)

    def norm(name, n):
        s[f"{name}.weight"] = (n,)
        s[f"{name}.bias"] = (n,)

    linear("encoder.0", token_dim, d_model)
    norm("encoder.2", d_model)
    for i in range(nlayers):
        p = f"transformer_encoder.layers.{i}"
        s[f"{p}.self_attn.in_proj_weight"] = (3 * d_model, d_model)
        s[f"{p}.self_attn.in_proj_bias"] = (3 * d_model,)
        linear(f"{p}.self_attn.out_proj", d_model, d_model)
        linear(f"{p}.linear1", d_model, d_hid)
        linear(f"{p}.linear2", d_hid, d_model)
        norm(f"{p}.norm1", d_model)
        norm(f"{p}.norm2", d_model)
    for i, (n_in, n_out) in enumerate([(d_model, 1024), (1024, output_dim), (output_dim, output_dim)]):
        linear(f"decoder.{i}.0", n_in, n_out)
        norm(f"decoder.{i}.1", n_out)
    linear("decoder.3", output_dim, output_dim)
    for i, (n_in, n_out) in enumerate([(output_dim + 1280, 2048), (2048, 512), (512, 128)]):
        linear(f"binary_decoder.{i}.0", n_in, n_out)
        norm(f"binary_decoder.{i}.1", n_out)
    linear("binary_decoder.3", 128, 1)
    linear("gene_embedding_layer.0", token_dim, d_model)
    norm("gene_embedding_layer.2", d_model)
    s["pe_embedding.weight"] = (table_rows, token_dim)
    return s


def _sinusoidal_pe(d_model: int, max_len: int = POSITIONAL_MAX_LEN) -> torch.Tensor:
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, 1, d_model)
    pe[:, 0, 0::2] = torch.sin(pos * inv)
    pe[:, 0, 1::2] = torch.cos(pos * inv)[:, : d_model // 2]
    return pe


#: Scales of the synthetic weights (std x 1/sqrt(fan_in) for projections; gain for the encoder
#: LayerNorm). Chosen so that the parity-relevant mistakes are visible (see module docstring).
WEIGHT_SCALES = {"encoder_gain": 0.3, "in_proj": 2.0, "out_proj": 4.0}


def _checkpoint(shapes: dict, table: torch.Tensor, *, d_model: int, seed: int) -> dict[str, torch.Tensor]:
    g = _torch_gen(seed, 3)

    def normal(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    sd: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key == "pos_encoder.pe":
            sd[key] = _sinusoidal_pe(d_model)
        elif key == "pe_embedding.weight":
            sd[key] = table
        elif key.startswith("binary_decoder."):
            sd[key] = torch.zeros(shape)
        elif key == "encoder.2.weight":  # small, jittered gain
            sd[key] = WEIGHT_SCALES["encoder_gain"] * (1.0 + 0.2 * normal(shape, 1.0))
        elif key.endswith("out_proj.weight"):  # larger attention output projection
            sd[key] = normal(shape, WEIGHT_SCALES["out_proj"] / math.sqrt(shape[1]))
        elif key.endswith("in_proj_weight"):
            sd[key] = normal(shape, WEIGHT_SCALES["in_proj"] / math.sqrt(shape[1]))
        elif len(shape) == 2:  # other linear weights
            sd[key] = normal(shape, 1.0 / math.sqrt(shape[1]))
        elif ".weight" in key:  # LayerNorm gains, jittered
            sd[key] = 1.0 + 0.2 * normal(shape, 1.0)
        else:  # biases (linear and LayerNorm)
            sd[key] = normal(shape, 0.05)
        assert tuple(sd[key].shape) == tuple(shape), key
        sd[key] = sd[key].contiguous()
    return sd


# --------------------------------------------------------------------------------------------
# model files
# --------------------------------------------------------------------------------------------
def write_model_files(dest, *, nlayers: int = 4, d_model: int = 64, d_hid: int = 128,
                      output_dim: int = 64, token_dim: int = 32, seed: int = 0,
                      checkpoint_name: str = "4layer_model.torch", n_human_genes: int = 4000,
                      full_table: bool = False, wheel: Path | None = None) -> dict:
    """Write synthetic model files in the official layout into ``dest``; return an info dict
    (``chrom_token_offset``, ``n_chrom_categories``, ``token_rows``, ``table_rows``,
    ``species_offsets``, ``nhead``, ``tie_groups`` …). See the module docstring."""
    dest = Path(dest)
    pe_dir = dest / "protein_embeddings"
    pe_dir.mkdir(parents=True, exist_ok=True)
    table = build_gene_table(seed=seed, n_human_genes=n_human_genes, wheel=wheel)

    # species_chrom.csv
    csv = table[["species", "gene_symbol", "chromosome", "start"]]
    tmp = dest / "species_chrom.csv.tmp"
    csv.to_csv(tmp, index=False)
    os.replace(tmp, dest / "species_chrom.csv")
    spec_chrom = pd.Categorical(csv["species"] + "_" + csv["chromosome"])
    n_cat = len(spec_chrom.categories)

    # protein embeddings and species blocks
    special = torch.randn((N_SPECIAL_TOKENS - 1, token_dim), generator=_torch_gen(seed, 2, 99))
    blocks, offsets, n_keys = [], {}, {}
    row = N_SPECIAL_TOKENS
    for i_species, species in enumerate(SPECIES):
        sub = table[table["species"] == species]
        order = seeded_rng(seed, 2, i_species).permutation(len(sub))
        keys = list(sub["symbol"].iloc[order])
        if species == "human":
            assert COLLISION_KEYS[0] in keys and COLLISION_KEYS[1] not in keys
            keys.append(COLLISION_KEYS[1])
        vals = torch.randn((len(keys), token_dim), generator=_torch_gen(seed, 2, i_species))
        # the values are views of one storage: same loaded dict, ~3x smaller file
        pe = {k: vals[i] for i, k in enumerate(keys)}
        _torch_save(pe, pe_dir / PROTEIN_EMBEDDING_FILES[species])
        upper: dict[str, torch.Tensor] = {}
        for k, v in pe.items():
            upper[k.upper()] = v  # position of first insertion, value of the last one
        missing = set(upper) - set(sub["gene_symbol"])
        assert not missing, missing
        offsets[species] = row
        n_keys[species] = len(upper)
        blocks.append(torch.stack(list(upper.values())))
        row += len(upper)
    n_gene_rows = row - N_SPECIAL_TOKENS
    tmp = dest / "species_offsets.pkl.tmp"
    with open(tmp, "wb") as fh:
        pickle.dump(offsets, fh)
    os.replace(tmp, dest / "species_offsets.pkl")

    head = torch.cat([torch.zeros(1, token_dim), special, *blocks])
    gchrom = _torch_gen(seed, 2, 100)
    if not full_table:
        chrom_rows = torch.randn((n_cat, token_dim), generator=gchrom)
        tokens = torch.cat([head, chrom_rows]).contiguous()
        ckpt_table = tokens
        chrom_offset = tokens.shape[0] - n_cat
    else:
        if head.shape[0] > OFFICIAL_TOKEN_ROWS or n_cat > OFFICIAL_N_CHROM_TOKENS:
            raise UserError("too many genes/chromosomes for the official table shape")
        filler = torch.randn((OFFICIAL_TOKEN_ROWS - head.shape[0], token_dim), generator=gchrom)
        tokens = torch.cat([head, filler]).contiguous()
        tail = torch.randn((OFFICIAL_N_CHROM_TOKENS, token_dim), generator=gchrom)
        ckpt_table = torch.cat([tokens, tail]).contiguous()
        chrom_offset = OFFICIAL_TOKEN_ROWS
    _torch_save(tokens, dest / "all_tokens.torch")

    shapes = checkpoint_shapes(nlayers=nlayers, d_model=d_model, d_hid=d_hid, output_dim=output_dim,
                               token_dim=token_dim, table_rows=ckpt_table.shape[0])
    _torch_save(_checkpoint(shapes, ckpt_table, d_model=d_model, seed=seed), dest / checkpoint_name)

    hum = table[table["species"] == "human"]
    ties = hum[hum.duplicated(["chromosome", "start"], keep=False)]
    tie_groups = [sorted(g["gene_symbol"]) for _, g in ties.groupby(["chromosome", "start"])]
    return {
        "nlayers": nlayers, "d_model": d_model, "nhead": max(1, d_model // 64), "d_hid": d_hid,
        "output_dim": output_dim, "token_dim": token_dim, "seed": seed,
        "checkpoint": checkpoint_name, "full_table": bool(full_table),
        "token_rows": int(tokens.shape[0]), "table_rows": int(ckpt_table.shape[0]),
        "chrom_token_offset": int(chrom_offset), "n_chrom_categories": int(n_cat),
        "n_gene_rows": int(n_gene_rows), "species_offsets": offsets, "n_keys": n_keys,
        "human_chrom_codes": {c.split("_", 1)[1]: i for i, c in enumerate(spec_chrom.categories)
                              if c.startswith("human_")},
        "tie_groups": tie_groups, "collision_keys": list(COLLISION_KEYS),
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
@click.command("make-demo")
@click.option("--dest", required=True, type=click.Path(file_okay=False),
              help="Output folder: writes DEST/model_files/, DEST/pbmc_demo.h5ad, DEST/mouse_demo.h5ad, DEST/demo_info.json.")
@click.option("--nlayers", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--d-model", default=64, show_default=True, type=click.IntRange(min=2))
@click.option("--d-hid", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--output-dim", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--token-dim", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--n-human-genes", default=4000, show_default=True, type=click.IntRange(min=1))
@click.option("--checkpoint-name", default="4layer_model.torch", show_default=True)
@click.option("--no-data", is_flag=True, help="Only write model_files/ (skip the demo h5ad files).")
@handle_errors
def make_demo_command(dest, nlayers, d_model, d_hid, output_dim, token_dim, seed, n_human_genes,
                      checkpoint_name, no_data):
    """Write synthetic UCE model files (official layout, seeded random weights) and demo data."""
    if d_model % 2:
        raise click.BadParameter("must be even (sinusoidal positional encoding)", param_hint="--d-model")
    dest = Path(dest)
    wheel = xclone_wheel()
    info = {"model_files": write_model_files(
        dest / "model_files", nlayers=nlayers, d_model=d_model, d_hid=d_hid, output_dim=output_dim,
        token_dim=token_dim, seed=seed, checkpoint_name=checkpoint_name,
        n_human_genes=n_human_genes, wheel=wheel)}
    if not no_data:
        info["data"] = write_demo_data(dest, seed=seed, wheel=wheel)
    tmp = dest / "demo_info.json.tmp"
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, dest / "demo_info.json")
    mf = info["model_files"]
    click.echo(f"wrote {dest}: token table {mf['table_rows']} x {token_dim}, "
               f"chrom_token_offset {mf['chrom_token_offset']}, {mf['n_chrom_categories']} chromosome tokens")
