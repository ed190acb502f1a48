"""A new species for UCE from its reference proteome (issue 13): the four commands and the last two steps.

  uce proteome --fasta X.pep.all.fa.gz --species NAME --output-dir D [--chunks N]   (proteome.py)
  uce esm-embed --proteins chunk.tsv --esm-model DIR --output chunk.pt             (esm.py)
  uce gene-embeddings --embeddings chunk*.pt --proteins proteins.tsv --output G.pt
  uce species-files --species NAME --taxonomy-id N --gene-embeddings G.pt --chrom-csv C.csv
                    --special-tokens all_tokens.torch --output-dir D

Gene embedding: the mean over all proteins of a gene symbol (fp32, summed in float64), keys in order
of the symbol's first protein in the FASTA (= proteins.tsv order).

Species files, the UCE notebook's recipe (facts, not its code): token table = rows 0-3 of the official
all_tokens.torch (PAD, chromosome open/close, CLS), then one row per gene in dict order, then one row
per distinct chromosome of the csv, drawn as torch.normal(0, 1) right after torch.manual_seed(taxonomy
id) (so everyone who adds a species gets the same chromosome tokens); species_offsets.pkl = {species:
4}; CHROM_TOKEN_OFFSET = 4 + number of genes. Gene rows follow prepare-species' vocabulary: symbols
upper-cased, a collision keeps the first position and the last value (how the official table was
built, uce-reference.md §3.3), so the rows always line up with the token ids prepare-species gives.
Chicken, the notebook's example: taxonomy 9031, CHROM_TOKEN_OFFSET 13275, i.e. 13,271 genes.
"""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

import click
import pandas as pd
import torch

from .io import UserError, atomic_path, handle_errors, write_json
from .model_files import CLS, NEW_SPECIES_CSV

log = logging.getLogger(__name__)
SPECIAL_ROWS = CLS + 1  # rows 0-3 of all_tokens.torch
CTX = {"show_default": True, "help_option_names": ["-h", "--help"]}
PathIn = click.Path(exists=True, dir_okay=False, path_type=Path)
PathOut = click.Path(dir_okay=False, path_type=Path)


def chrom_token_offset(n_genes: int) -> int:
    return SPECIAL_ROWS + n_genes


def gene_embeddings(embedding_files: list[Path], proteins: Path, output: Path) -> dict[str, torch.Tensor]:
    from .esm import load_embeddings
    from .proteome import read_proteins
    rows: dict[str, tuple[Path, torch.Tensor]] = {}
    width = None
    for path in embedding_files:
        obj = load_embeddings(path)
        emb = obj["embeddings"]
        if width is not None and emb.shape[1] != width:
            raise UserError(f"{path}: embeddings of width {emb.shape[1]}, other chunks have {width}; embed every "
                            "chunk with the same --esm-model")
        width = emb.shape[1]
        for pid, vec in zip(obj["protein_ids"], emb):
            if pid in rows:
                raise UserError(f"protein {pid} is in both {rows[pid][0]} and {path}; pass each chunk once")
            rows[pid] = (path, vec)
    df = read_proteins(proteins)
    missing = [p for p in df["protein_id"] if p not in rows]
    if missing:
        raise UserError(f"{len(missing)} proteins of {proteins} have no embedding (first: {missing[0]}); run "
                        "`uce esm-embed` on every chunk and pass all of them with --embeddings")
    sums: dict[str, list] = {}  # symbol -> [float64 sum, count], insertion order = first appearance
    for pid, sym in zip(df["protein_id"], df["gene_symbol"]):
        acc = sums.setdefault(sym, [torch.zeros(width, dtype=torch.float64), 0])
        acc[0] += rows[pid][1].double()
        acc[1] += 1
    genes = {sym: (s / n).float() for sym, (s, n) in sums.items()}
    with atomic_path(output) as tmp:
        torch.save(genes, tmp)
    return genes


def load_gene_embeddings(path: Path) -> dict[str, torch.Tensor]:
    from .model_files import _load
    genes = _load(path)
    if not isinstance(genes, dict) or not genes:
        raise UserError(f"{path}: not a gene embedding file ({{gene symbol: tensor}}); write it with `uce gene-embeddings`")
    widths = {tuple(v.shape) for v in genes.values() if isinstance(v, torch.Tensor)}
    if len(widths) != 1 or len(next(iter(widths))) != 1 or not all(isinstance(v, torch.Tensor) for v in genes.values()):
        raise UserError(f"{path}: values must be 1-D tensors of one width (got shapes {sorted(widths)[:3]}); "
                        "write it with `uce gene-embeddings`")
    return genes


def vocabulary_rows(genes: dict[str, torch.Tensor], path: Path) -> tuple[list[str], torch.Tensor]:
    """Upper-cased symbols (first position) and their rows (last value): prepare-species' vocabulary."""
    rows: dict[str, torch.Tensor] = {}
    for sym, vec in genes.items():
        rows[str(sym).upper()] = vec  # an existing key keeps its position, takes the new value
    if len(rows) < len(genes):
        log.warning("%s: %d gene symbols collide after upper-casing; each keeps its first position and its last "
                    "embedding (the reference's rule)", path, len(genes) - len(rows))
    return list(rows), torch.stack([v.float() for v in rows.values()])


def chromosome_rows(taxonomy_id: int, n_chrom: int, width: int) -> torch.Tensor:
    """What torch.normal(0, 1, size) draws right after torch.manual_seed(taxonomy_id), without touching
    the global generator (a fresh CPU generator with the same seed yields the same stream)."""
    g = torch.Generator().manual_seed(int(taxonomy_id))
    return torch.normal(0.0, 1.0, size=(n_chrom, width), generator=g)


def read_chrom_csv(path: Path, species: str) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"species": str, "gene_symbol": str, "chromosome": str})
    missing = {"species", "gene_symbol", "chromosome", "start"} - set(df.columns)
    if missing:
        raise UserError(f"{path}: missing columns {sorted(missing)}; expected species,gene_symbol,chromosome,start "
                        "(as `uce proteome` writes it)")
    other = sorted(set(df["species"]) - {species})
    if other:
        raise UserError(f"{path}: rows of other species ({', '.join(other[:3])}); pass the csv of '{species}' only")
    # the notebook's column order (proteome.py); a hand-made csv with duplicate symbols keeps the first row
    df = df[["gene_symbol", "chromosome", "start", "species"]].assign(gene_symbol=df["gene_symbol"].str.upper())
    return df[~df["gene_symbol"].duplicated()]


def species_files(species: str, taxonomy_id: int, gene_embeddings_path: Path, chrom_csv: Path, special_tokens: Path,
                  output_dir: Path, checkpoint: Path | None = None, source: str | None = None) -> dict:
    from .esm import check_width
    from .model_files import _load
    from .proteome import check_species_name
    check_species_name(species)
    genes = load_gene_embeddings(gene_embeddings_path)
    symbols, gene_rows = vocabulary_rows(genes, gene_embeddings_path)
    width = gene_rows.shape[1]
    check_width(width, checkpoint, f"--gene-embeddings {gene_embeddings_path}")
    special = _load(special_tokens)  # memory-mapped: the official 2.9 GB file is not read, only 4 rows
    if not isinstance(special, torch.Tensor) or special.dim() != 2 or special.shape[0] < SPECIAL_ROWS:
        raise UserError(f"{special_tokens}: not a token table (a 2-D tensor of >= {SPECIAL_ROWS} rows); pass the "
                        "official all_tokens.torch (or the demo's)")
    if special.shape[1] != width:
        raise UserError(f"{special_tokens}: token width {special.shape[1]} does not match the gene embeddings' "
                        f"{width} ({gene_embeddings_path}); pass the all_tokens.torch of the model family of your ESM2")
    chroms = read_chrom_csv(chrom_csv, species)
    n_chrom = int(chroms["chromosome"].nunique())
    unplaced = len(set(symbols) - set(chroms["gene_symbol"]))
    if unplaced:
        log.warning("%d of %d genes of %s are not in %s: they get token rows but never enter a sentence",
                    unplaced, len(symbols), gene_embeddings_path, chrom_csv)
    table = torch.cat([special[:SPECIAL_ROWS].float(), gene_rows, chromosome_rows(taxonomy_id, n_chrom, width)])
    offset = chrom_token_offset(len(symbols))

    output_dir.mkdir(parents=True, exist_ok=True)
    pe_name = gene_embeddings_path.name
    with atomic_path(output_dir / "protein_embeddings" / pe_name) as tmp:
        shutil.copyfile(gene_embeddings_path, tmp)
    with atomic_path(output_dir / "all_tokens.torch") as tmp:
        torch.save(table.contiguous(), tmp)
    with atomic_path(output_dir / "species_offsets.pkl") as tmp:
        tmp.write_bytes(pickle.dumps({species: SPECIAL_ROWS}))
    with atomic_path(output_dir / "species_chrom.csv") as tmp:
        chroms.to_csv(tmp, index=False)
    with atomic_path(output_dir / NEW_SPECIES_CSV) as tmp:
        pd.DataFrame({"species": [species], "path": [pe_name]}).to_csv(tmp, index=False)
    if checkpoint is not None:  # linked, not copied: the official checkpoints are GBs
        link = output_dir / Path(checkpoint).name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(checkpoint).resolve())
    info = {"species": species, "taxonomy_id": int(taxonomy_id), "genes": len(symbols), "chromosomes": n_chrom,
            "chrom_token_offset": offset, "token_rows": int(table.shape[0]), "token_dim": int(width),
            "gene_embeddings": str(gene_embeddings_path), "chrom_csv": str(chrom_csv),
            "special_tokens": str(special_tokens), "source": source or f"gene embeddings {gene_embeddings_path.name}"}
    write_json(output_dir / "species_files.json", info)
    return info


@click.command(context_settings=CTX)
@click.option("--fasta", type=PathIn, required=True, help="Ensembl peptide FASTA, <Species>.<assembly>.pep.all.fa[.gz].")
@click.option("--species", required=True, help="Name of the new species (not one of the 8 built-in ones).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--chunks", type=click.IntRange(1), default=1,
              help="Also write proteins.chunk-NNN.tsv: N files of near-equal residues, one per GPU task.")
@handle_errors
def proteome_command(fasta, species, output_dir, chunks):
    """Proteins (proteins.tsv) and gene locations (<species>_chrom.csv) of a reference proteome."""
    from .proteome import build_proteome
    s = build_proteome(fasta, species, output_dir, chunks)
    log.info("%s: %d records, %d proteins of %d genes on %d chromosomes kept; dropped %d with '*', %d without "
             "gene_symbol, %d without location", fasta, s["records"], s["proteins"], s["genes"], s["chromosomes"],
             s["dropped_stop_codon"], s["dropped_no_gene_symbol"], s["dropped_no_location"])


@click.command(context_settings=CTX)
@click.option("--proteins", type=PathIn, required=True, help="proteins.tsv or one chunk of it (`uce proteome`).")
@click.option("--esm-model", type=click.Path(exists=True, path_type=Path), required=True,
              help="Local Hugging Face EsmModel folder (config.json, weights, vocab.txt), e.g. esm2_t48_15B_UR50D.")
@click.option("--output", type=PathOut, required=True, help="Embeddings file (.pt); an existing valid one is kept.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", help="auto: bf16 on GPU, fp32 on CPU.")
@click.option("--token-budget", type=click.IntRange(1026), default=None,
              help="Padded positions per batch (default 32768 on GPU, 4096 on CPU); an OOM halves the batch.")
@click.option("--checkpoint", type=PathIn, default=None, help="UCE checkpoint whose token_dim the model must match.")
@click.option("--gpu-lock-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="As `uce embed`: folder shared by the node's GPU tasks, where each claims one free GPU.")
@click.option("--gpu-wait", type=click.IntRange(0), default=24 * 3600,
              help="Seconds to wait for a free GPU when every GPU of the node is claimed.")
@handle_errors
def esm_embed_command(proteins, esm_model, output, device, precision, token_budget, checkpoint, gpu_lock_dir, gpu_wait):
    """Per-protein ESM2 embeddings: mean of the last layer over residues (BOS/EOS out, 1,022 residues)."""
    from .esm import esm_embed
    esm_embed(proteins, esm_model, output, device, precision, token_budget, checkpoint, gpu_lock_dir, gpu_wait)


@click.command(context_settings=CTX)
@click.option("--embeddings", type=PathIn, required=True, multiple=True, help="Chunk files of `uce esm-embed`.")
@click.option("--proteins", type=PathIn, required=True, help="The whole proteins.tsv of `uce proteome`.")
@click.option("--output", type=PathOut, required=True, help="<Species>.<assembly>.gene_symbol_to_embedding_ESM2.pt")
@handle_errors
def gene_embeddings_command(embeddings, proteins, output):
    """Gene embeddings: the mean over each gene symbol's proteins, in FASTA order."""
    genes = gene_embeddings(list(embeddings), proteins, output)
    log.info("wrote %d gene embeddings to %s", len(genes), output)


@click.command(context_settings=CTX)
@click.option("--species", required=True)
@click.option("--taxonomy-id", type=click.IntRange(1), required=True, help="NCBI taxonomy id: seeds the chromosome tokens.")
@click.option("--gene-embeddings", type=PathIn, required=True, help="From `uce gene-embeddings` (or a published .pt).")
@click.option("--chrom-csv", type=PathIn, required=True, help="<species>_chrom.csv from `uce proteome`.")
@click.option("--special-tokens", type=PathIn, required=True,
              help="all_tokens.torch whose rows 0-3 are the special tokens (the official file; the demo's for the demo).")
@click.option("--checkpoint", type=PathIn, default=None, help="UCE checkpoint: token_dim checked, linked into --output-dir.")
@click.option("--source", default=None, help="Where the files came from, recorded in species_files.json (the report shows it).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@handle_errors
def species_files_command(species, taxonomy_id, gene_embeddings, chrom_csv, special_tokens, checkpoint, source, output_dir):
    """Token table, offsets and chromosome csv of a new species: a model_files folder for prepare-species."""
    info = species_files(species, taxonomy_id, gene_embeddings, chrom_csv, special_tokens, output_dir, checkpoint, source)
    log.info("%s: %d genes, %d chromosomes, %d token rows in %s", species, info["genes"], info["chromosomes"],
             info["token_rows"], output_dir)
    click.echo(f"CHROM_TOKEN_OFFSET = {info['chrom_token_offset']}")
