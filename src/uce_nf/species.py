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
from .model_files import (CHROM_CLOSE, CLS, OFFICIAL_TABLE_ROWS, OFFICIAL_TOKEN_ROWS, PAD, REFERENCE_CHROM_TOKEN_OFFSET,
                          ModelConfig, ModelFiles, PROTEIN_EMBEDDING_FILES, _load, chrom_code_dtype, sha256_of,
                          species_vocabulary)

log = logging.getLogger(__name__)
FORMAT = "uce-nf/species/1"
VOCAB_FORMAT = "uce-nf/species-vocab/1"  # the model-independent half (species_vocab)
EMBED_MODULES = ("pos_encoder", "transformer_encoder", "decoder", "encoder")  # state-dict prefixes EMBED uses


def species_vocab(files: ModelFiles, species: str, chrom_token_offset: int | None = None,
                  source: str | None = None, taxonomy_id: int | None = None) -> dict:
    """The model-independent half: what PREPROCESS, INDEX and SENTENCES use. Reads no checkpoint, so
    switching checkpoints reuses it. The token table is found from the token file alone: an official-size
    file means the checkpoint's own table, which both official checkpoints have at 145,469 rows (assumed
    here, checked by project_species); any other size means the token file's rows, copied in for the
    vocabulary only (a replaced token file is not part of any checkpoint). `source` and `taxonomy_id`: where
    a new species' files came from (the pipeline passes its species sheet row), recorded for the report."""
    offsets = files.species_offsets()
    if species not in offsets:
        raise UserError(f"species '{species}' is not in {files.paths['offset_pkl']}; supported: "
                        f"{', '.join(sorted(offsets))}")
    symbols = species_vocabulary(files, species)
    token_ids = np.arange(len(symbols), dtype=np.int64) + offsets[species]
    codes, starts, in_csv, n_cat = species_chromosomes(files, species, symbols)
    rows, width = files.token_table_shape()
    checkpoint_table = rows in (OFFICIAL_TOKEN_ROWS, OFFICIAL_TABLE_ROWS)
    table_rows = OFFICIAL_TABLE_ROWS if checkpoint_table else rows
    offset, how = resolve_chrom_token_offset(files, species, len(symbols), table_rows, checkpoint_table,
                                             codes[in_csv], n_cat, chrom_token_offset)
    chrom_tokens = offset + np.unique(codes[in_csv]).astype(np.int64)
    vocab = np.unique(np.concatenate([[PAD, CHROM_CLOSE, CLS], token_ids[in_csv], chrom_tokens]))
    if vocab[-1] >= table_rows:
        raise UserError(f"token ids of '{species}' reach {vocab[-1]} but the token table has {table_rows} rows; "
                        "species_offsets.pkl and the token file do not belong together")
    out = {
        "format": VOCAB_FORMAT, "version": __version__, "species": species,
        "symbols": symbols, "token_ids": torch.from_numpy(token_ids),
        "chrom_codes": torch.from_numpy(codes.astype(np.int64)), "chrom_code_dtype": str(codes.dtype),
        "starts": torch.from_numpy(starts), "in_chrom_csv": torch.from_numpy(in_csv),
        "chrom_token_offset": int(offset), "chrom_token_offset_how": how, "vocab": torch.from_numpy(vocab),
        "origin": species_origin(species, source, taxonomy_id),
        "table": {"source": "checkpoint" if checkpoint_table else "token_file", "rows": int(table_rows),
                  "width": int(width), "file": files.paths["token_file"].name},
    }
    if not checkpoint_table:
        out["token_rows"] = _load(files.paths["token_file"])[torch.from_numpy(vocab)].float().clone()
    return out


def species_origin(species: str, source: str | None, taxonomy_id: int | None) -> dict:
    """Built in (one of UCE's own species) or new, and what is known of a new species' files. Older
    vocabularies have no 'origin': the report says "not recorded" for them."""
    new = species not in PROTEIN_EMBEDDING_FILES or source is not None or taxonomy_id is not None
    origin = {"kind": "new" if new else "built-in"}
    if source:
        origin["source"] = str(source)
    if taxonomy_id is not None:
        origin["taxonomy_id"] = int(taxonomy_id)
    return origin


def project_species(vocab: dict, sd: dict, checkpoint: Path, nhead: int | None = None) -> dict:
    """The per-checkpoint half: the vocabulary's token rows projected by this checkpoint, and the weights
    EMBED needs. A checkpoint that breaks what the vocabulary assumed is one line, never a quiet difference."""
    config = check_checkpoint(vocab, sd, checkpoint, nhead)
    ids = vocab["vocab"].numpy()
    if vocab["table"]["source"] == "checkpoint":
        projected = project_tokens(sd, sd["pe_embedding.weight"], ids)
    else:
        projected = project_tokens(sd, vocab["token_rows"], np.arange(len(ids)))
    # EMBED needs the transformer and decoder only: the token table (~3 GB of each official checkpoint)
    # is already projected above, and binary_decoder/gene_embedding_layer are training heads.
    weights = {k: v.contiguous().clone() for k, v in sd.items() if k.split(".")[0] in EMBED_MODULES}
    out = {k: v for k, v in vocab.items() if k not in ("format", "table", "token_rows")}
    out.update({"format": FORMAT, "version": __version__, "projected": projected, "weights": weights,
                "model": {"file": Path(checkpoint).name, "sha256": sha256_of(checkpoint),
                          "size": Path(checkpoint).stat().st_size, "config": config.__dict__}})
    return out


def check_checkpoint(vocab: dict, sd: dict, checkpoint: Path, nhead: int | None = None) -> ModelConfig:
    """What the vocabulary assumed about the checkpoint, checked: one line each."""
    config = ModelConfig.from_state_dict(sd, nhead)
    t = vocab["table"]
    if t["width"] != config.token_dim:
        raise UserError(f"{t['file']}: token width {t['width']} does not match the checkpoint's token_dim "
                        f"{config.token_dim} ({Path(checkpoint).name}); use the token file of this model")
    rows = sd["pe_embedding.weight"].shape[0]
    if t["source"] == "checkpoint" and rows != t["rows"]:
        raise UserError(f"{Path(checkpoint).name}: its token table has {rows} rows, not the official {t['rows']} that "
                        f"the vocabulary of '{vocab['species']}' assumed for the official-size {t['file']}; pass "
                        "--token_file with this checkpoint's own token table (and --chrom_token_offset)")
    return config


def prepare_species(files: ModelFiles, species: str, nhead: int | None = None,
                    chrom_token_offset: int | None = None) -> dict:
    """Both halves in one go (`uce run`, `uce prepare-species --model-dir`)."""
    vocab = species_vocab(files, species, chrom_token_offset)
    return project_species(vocab, files.checkpoint(), files.paths["model"], nhead)


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


def resolve_chrom_token_offset(files: ModelFiles, species: str, n_genes: int, table_rows: int,
                               checkpoint_table: bool, species_codes: np.ndarray, n_categories: int,
                               given: int | None) -> tuple[int, str]:
    """First table row of the chromosome tokens: chromosome token = category code + offset.

    The reference never derives it: CHROM_TOKEN_OFFSET is an argument, 143574 by default (the rows of
    all_tokens.torch, after which it appends the chromosome rows), and the new-species notebook makes
    users pass 4 + n_genes for their own token file (uce-reference.md §2, §3.3, §3.5). So: the given
    value; else 143574 when the checkpoint's own table is used; else, for a replaced token file, only
    what its layout proves (the gene blocks of species_offsets.pkl, then one row per chromosome
    category of species_chrom.csv, and nothing else). Returns the offset and how it was found ("given",
    "reference default ...", "inferred: <proof>"), which the species file records for the report."""
    if given is not None:
        offset, how = int(given), "given"
    elif checkpoint_table:
        offset, how = REFERENCE_CHROM_TOKEN_OFFSET, "reference default (the checkpoint's token table)"
    else:
        gene_end, proof = gene_rows_end(files, species, n_genes)
        if gene_end is None or table_rows - gene_end != n_categories:
            why = proof if gene_end is None else (f"after the gene blocks (row {gene_end}) come {table_rows - gene_end} "
                                                  f"rows, not one per chromosome category ({n_categories})")
            raise UserError(
                f"--chrom_token_offset is required for {files.paths['token_file']} ({table_rows} rows, not the "
                f"official {OFFICIAL_TOKEN_ROWS}; {why}): pass the CHROM_TOKEN_OFFSET the token file was built with "
                "(4 + number of genes for a file made by the UCE new-species notebook)")
        offset, how = gene_end, (f"inferred: {proof} and the remaining {n_categories} rows are one per chromosome "
                                 f"of {files.paths['spec_chrom_csv'].name}")
    check_chrom_token_offset(offset, species, files.species_offsets(), n_genes, table_rows, species_codes)
    log.info("chrom_token_offset %d (%s)", offset, how)
    return offset, how


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


def gene_rows_end(files: ModelFiles, species: str, n_genes: int) -> tuple[int | None, str]:
    """First row after every species' gene block, and how that is known; (None, why) when unproven.

    Every species' protein embeddings (a model folder, or each file staged by the pipeline) give the
    block sizes, hence the end. Without some of them the end is proven only when this species holds the
    last block (the new-species notebook's single-species layout). Nothing is assumed beyond that: a
    wrong offset would give every cell wrong chromosome tokens, silently."""
    offsets = files.species_offsets()
    end, unknown = offsets[species] + n_genes, []
    for sp, first in offsets.items():
        if sp == species:
            continue
        try:
            end = max(end, first + len(species_vocabulary(files, sp)))
        except UserError:
            unknown.append(sp)
    name = files.paths["offset_pkl"].name
    if not unknown:
        return end, f"the gene blocks of {name} end there"
    if max(offsets, key=offsets.get) == species:  # every other block starts before this one, which ends at `end`
        return end, f"'{species}' holds the last gene block of {name}, which ends there"
    return None, f"protein embeddings of {', '.join(sorted(unknown))} not found, so where the gene blocks end is unknown"


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


def load_vocab(path: Path) -> dict:
    """What PREPROCESS, INDEX and VALIDATE read: a vocabulary file, or a whole species file (same keys).
    A vocabulary that records a problem with the model files raises it, as one line."""
    try:
        obj = load_tagged(path, VOCAB_FORMAT, "a species vocabulary", "uce species-vocab", weights_only=False)
    except UserError:
        return load_species(path)
    if obj.get("error"):
        raise UserError(obj["error"])
    return obj


def vocab_error(species: str, message: str) -> dict:
    """A vocabulary that holds only a problem: the pipeline reports it per dataset at VALIDATE."""
    return {"format": VOCAB_FORMAT, "version": __version__, "species": species, "error": message}
