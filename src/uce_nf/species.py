"""Per (species, checkpoint) preparation, done once and shared by every dataset of that species.

The species file holds what the later steps need and nothing more:
- the species vocabulary: upper-cased symbols, global token ids, chromosome codes and starts;
- the projected token table: encoder(normalize(row)) * sqrt(d_model) for every token a sentence of
  this species can contain. The projection is position-independent (uce-reference.md §8.1-2), so it
  is computed once here instead of on every position of every cell (14 GFLOP/cell saved).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .io import UserError, atomic_path, load_tagged
from .model_files import (CHROM_CLOSE, CLS, OFFICIAL_TOKEN_ROWS, PAD, REFERENCE_CHROM_TOKEN_OFFSET, ModelConfig, ModelFiles,
                          chrom_code_dtype, sha256_of, species_vocabulary, token_table)

log = logging.getLogger(__name__)
FORMAT = "uce-nf/species/1"
EMBED_MODULES = ("pos_encoder", "transformer_encoder", "decoder", "encoder")  # state-dict prefixes EMBED uses


def prepare_species(files: ModelFiles, species: str, nhead: int | None = None,
                    chrom_token_offset: int | None = None) -> dict:
    offsets = files.species_offsets()
    if species not in offsets:
        raise UserError(f"species '{species}' is not in {files.paths['offset_pkl']}; supported: "
                        f"{', '.join(sorted(offsets))}")
    symbols = species_vocabulary(files, species)
    token_ids = np.arange(len(symbols), dtype=np.int64) + offsets[species]

    codes, starts, in_csv, n_cat = species_chromosomes(files, species, symbols)

    sd = files.checkpoint()
    config = ModelConfig.from_state_dict(sd, nhead)
    table = token_table(files, sd)
    offset = resolve_chrom_token_offset(files, species, len(symbols), int(table.shape[0]),
                                        table is sd["pe_embedding.weight"], codes[in_csv], n_cat,
                                        chrom_token_offset)
    chrom_tokens = offset + np.unique(codes[in_csv]).astype(np.int64)
    vocab = np.unique(np.concatenate([[PAD, CHROM_CLOSE, CLS], token_ids[in_csv], chrom_tokens]))
    if vocab[-1] >= table.shape[0]:
        raise UserError(f"token ids of '{species}' reach {vocab[-1]} but the token table has {table.shape[0]} rows; "
                        "species_offsets.pkl and the token file do not belong together")
    projected = project_tokens(sd, table, vocab)
    # EMBED needs the transformer and decoder only: the token table (~3 GB of each official checkpoint)
    # is already projected above, and binary_decoder/gene_embedding_layer are training heads.
    weights = {k: v.contiguous().clone() for k, v in sd.items() if k.split(".")[0] in EMBED_MODULES}
    return {
        "format": FORMAT, "version": __version__, "species": species,
        "symbols": symbols, "token_ids": torch.from_numpy(token_ids),
        "chrom_codes": torch.from_numpy(codes.astype(np.int64)), "chrom_code_dtype": str(codes.dtype),
        "starts": torch.from_numpy(starts), "in_chrom_csv": torch.from_numpy(in_csv),
        "chrom_token_offset": int(offset),
        "vocab": torch.from_numpy(vocab), "projected": projected, "weights": weights,
        "model": {"file": files.paths["model"].name, "sha256": sha256_of(files.paths["model"]),
                  "size": files.paths["model"].stat().st_size, "config": config.__dict__},
    }


def species_chromosomes(files: ModelFiles, species: str, symbols: list[str]):
    """Per vocabulary symbol: global chromosome category code (§3.5), start, whether the csv has it;
    and the number of categories."""
    chroms = files.chrom_table()
    n_cat = len(chroms["spec_chrom"].cat.categories)
    rows = chroms[chroms["species"] == species]
    dup = rows["gene_symbol"].duplicated()
    if dup.any():  # the reference would silently misalign here; keep the first row, say so
        log.warning("%s: %d duplicated gene symbols for %s; using the first row of each",
                    files.paths["spec_chrom_csv"], int(dup.sum()), species)
        rows = rows[~dup]
    rows = rows.set_index("gene_symbol").reindex(symbols)
    in_csv = rows["start"].notna().to_numpy()
    codes = np.where(in_csv, rows["spec_chrom"].cat.codes.to_numpy(), -1).astype(chrom_code_dtype(n_cat))
    starts = np.where(in_csv, rows["start"].fillna(0).to_numpy(), 0).astype(np.int64)
    if not in_csv.all():
        log.warning("%d of %d %s genes with embeddings are missing from %s and will not be used",
                    int((~in_csv).sum()), len(symbols), species, files.paths["spec_chrom_csv"])
    return codes, starts, in_csv, n_cat


def chrom_token_offset_for(files: ModelFiles, species: str, symbols: list[str], given: int | None = None,
                           sd: dict | None = None) -> int:
    """The offset prepare_species will use, checked, without projecting anything (VALIDATE)."""
    codes, _, in_csv, n_cat = species_chromosomes(files, species, symbols)
    sd = sd if sd is not None else files.checkpoint()
    table = token_table(files, sd)
    return resolve_chrom_token_offset(files, species, len(symbols), int(table.shape[0]),
                                      table is sd["pe_embedding.weight"], codes[in_csv], n_cat, given)


def resolve_chrom_token_offset(files: ModelFiles, species: str, n_genes: int, table_rows: int,
                               checkpoint_table: bool, species_codes: np.ndarray, n_categories: int,
                               given: int | None) -> int:
    """First table row of the chromosome tokens: chromosome token = category code + offset.

    The reference never derives it: CHROM_TOKEN_OFFSET is an argument, 143574 by default (the rows of
    all_tokens.torch, after which it appends the chromosome rows), and the new-species notebook makes
    users pass 4 + n_genes for their own token file (uce-reference.md §2, §3.3, §3.5). So: the given
    value; else 143574 when the checkpoint's own table is used; else, for a replaced token file, only
    what its layout proves (the gene blocks of species_offsets.pkl, then one row per chromosome
    category of species_chrom.csv, and nothing else)."""
    if given is not None:
        offset, how = int(given), "given"
    elif checkpoint_table:
        offset, how = REFERENCE_CHROM_TOKEN_OFFSET, "the reference default for the checkpoint's token table"
    else:
        gene_end = gene_rows_end(files)
        if gene_end is None or table_rows - gene_end != n_categories:
            raise UserError(
                f"--chrom_token_offset is required for {files.paths['token_file']} ({table_rows} rows, not the "
                f"official {OFFICIAL_TOKEN_ROWS}): pass the CHROM_TOKEN_OFFSET the token file was built with "
                "(4 + number of genes for a file made by the UCE new-species notebook)")
        offset, how = gene_end, (f"inferred: the gene blocks of {files.paths['offset_pkl'].name} end there and the "
                                 f"remaining {n_categories} rows are one per chromosome of {files.paths['spec_chrom_csv'].name}")
    check_chrom_token_offset(offset, species, files.species_offsets(), n_genes, table_rows, species_codes)
    log.info("chrom_token_offset %d (%s)", offset, how)
    return offset


def check_chrom_token_offset(offset: int, species: str, offsets: dict[str, int], n_genes: int, table_rows: int,
                             species_codes: np.ndarray) -> None:
    """Impossible offsets, as one line each: rows past the table, or rows of the gene blocks."""
    gene_end = offsets[species] + n_genes
    if offset < gene_end or offset <= max(offsets.values()):
        raise UserError(f"--chrom_token_offset {offset} lands inside the gene rows of the token table "
                        f"('{species}' genes are rows {offsets[species]}..{gene_end - 1}); pass the first row after "
                        f"every species' genes (the reference default is {REFERENCE_CHROM_TOKEN_OFFSET})")
    top = offset + int(species_codes.max()) if len(species_codes) else offset
    if top >= table_rows:
        raise UserError(f"--chrom_token_offset {offset}: chromosome tokens of '{species}' reach row {top} but the "
                        f"token table has {table_rows} rows; pass the offset the token file was built with")


def gene_rows_end(files: ModelFiles) -> int | None:
    """First row after every species' gene block, when every species of the offsets file has its
    protein embeddings (their sizes prove where the blocks end); else None."""
    end = 0
    for sp, first in files.species_offsets().items():
        try:
            end = max(end, first + len(species_vocabulary(files, sp)))
        except UserError:
            return None
    return end


@torch.no_grad()
def project_tokens(sd: dict, table: torch.Tensor, vocab: np.ndarray, chunk: int = 4096) -> torch.Tensor:
    """encoder(normalize(table[vocab])) * sqrt(d_model) in fp32: [V, token_dim] -> [V, d_model]."""
    w, b = sd["encoder.0.weight"].float(), sd["encoder.0.bias"].float()
    ln_w, ln_b = sd["encoder.2.weight"].float(), sd["encoder.2.bias"].float()
    d_model = w.shape[0]
    out = []
    for i in range(0, len(vocab), chunk):
        rows = table[torch.from_numpy(vocab[i:i + chunk])].float()  # [v, token_dim], gathered from the mmap
        x = F.normalize(rows, dim=1)
        x = F.layer_norm(F.gelu(F.linear(x, w, b)), (d_model,), ln_w, ln_b, eps=1e-5)
        out.append(x * math.sqrt(d_model))
    return torch.cat(out)


def check_species_file_checkpoint(sf: dict, sf_path: Path, checkpoint: Path) -> None:
    """A species file holds one checkpoint's projected tokens: embedding with another checkpoint of the
    same width would silently use the wrong table. Compare size (free), then sha256 (seconds per GB)."""
    want = sf["model"]
    if not Path(checkpoint).exists():
        raise UserError(f"{checkpoint}: checkpoint not found; pass the --model the species file was prepared with "
                        f"({want['file']})")
    size = Path(checkpoint).stat().st_size
    if size != want["size"] or sha256_of(checkpoint) != want["sha256"]:
        raise UserError(f"{sf_path}: prepared for checkpoint {want['file']} ({want['size']} bytes, sha256 "
                        f"{want['sha256'][:12]}…), not {Path(checkpoint).name} ({size} bytes); pass that checkpoint "
                        "as --model, or re-run prepare-species with this one")


def save_species(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_species(path: Path) -> dict:
    return load_tagged(path, FORMAT, "a species file", "uce prepare-species", weights_only=False)
