"""A species' reference proteome, from an Ensembl peptide FASTA (`<Species>.<assembly>.pep.all.fa[.gz]`).

The UCE new-species recipe (issue 13, facts from the UCE notebook): drop sequences containing `*`;
the gene symbol is the `gene_symbol:` field, everything after its first colon (zebrafish symbols such
as `si:ch211-1a2.3` contain colons); the location is the `chromosome:` (or `primary_assembly:`, and
likewise `scaffold:`/`contig:`) field `<system>:<assembly>:<name>:<start>:<end>:<strand>`.

The chromosome table follows the notebook's steps, so that its files and ours are identical: every
header with a gene symbol and a location counts (also those of sequences with `*`: the notebook reads
headers only); a gene's chromosome and start are those of its LAST header in the FASTA; symbols are
upper-cased; rows sorted by (chromosome, start) as strings; columns gene_symbol,chromosome,start,species.
One deliberate difference: symbols that collide after upper-casing get one row (the last header's),
not one row each (the reference cannot index duplicate rows: misaligned genes, uce-reference.md §17).

Decisions, where the recipe says nothing:
- proteins without `gene_symbol:` are dropped (UCE tokens are gene symbols), and so are proteins
  without a location (a gene without a chromosome can never enter a cell sentence); both counted;
- chunks for GPU tasks are balanced by residues (truncated at 1,022, what the model sees), each
  chunk keeping FASTA order.
"""

from __future__ import annotations

import gzip
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .io import UserError, atomic_path, write_json

log = logging.getLogger(__name__)
PROTEIN_COLUMNS = ["protein_id", "gene_symbol", "sequence"]
MAX_RESIDUES = 1022  # fair-esm extract.py --truncate: 1,022 residues + BOS + EOS = 1,024 positions
# <system>:<assembly>:<name>:<start>:<end>:<strand>; a name may itself contain ':' (so parse from the right)
LOCATION = re.compile(r"^(chromosome|primary_assembly|scaffold|contig|supercontig|plasmid):([^:]*):(.+):(\d+):(\d+):(-?1)$")
SPECIES_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass
class Protein:
    protein_id: str
    gene_symbol: str
    chromosome: str
    start: int
    sequence: str


def check_species_name(species: str) -> None:
    from .model_files import PROTEIN_EMBEDDING_FILES
    if not SPECIES_NAME.match(species):
        raise UserError(f"--species '{species}': use letters, digits and '_' only, starting with a letter "
                        "(it becomes a csv value and part of file names), e.g. chicken or gallus_gallus")
    if species in PROTEIN_EMBEDDING_FILES:
        raise UserError(f"--species '{species}' is one of the 8 built-in UCE species; its files ship with the "
                        "official model files; give a new species another name")


def parse_header(description: str) -> tuple[str | None, str | None, int | None]:
    """(gene symbol, chromosome, start) of an Ensembl peptide header; None where absent."""
    symbol = chrom = start = None
    for field in description.split()[1:]:
        if field.startswith("description:"):  # free text follows; never read fields from it
            break
        if symbol is None and field.startswith("gene_symbol:"):
            symbol = field.split(":", 1)[1] or None
        elif chrom is None and (m := LOCATION.match(field)):
            chrom, start = m.group(3), int(m.group(4))
    return symbol, chrom, start


def _open_text(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"  # by content: a .fa that is gzip'd (or not) still works
    return gzip.open(path, "rt") if gz else open(path, "rt")


def read_proteome(fasta: Path) -> tuple[list[Protein], dict, list[tuple[str, str, int]]]:
    """Proteins kept, in FASTA order; counts of what was dropped and why; (symbol, chromosome, start)
    of every header that has both, in FASTA order (the notebook's chromosome table reads all headers)."""
    from Bio import SeqIO  # optional dependency, imported only by the commands that need it
    stats = {"records": 0, "dropped_stop_codon": 0, "dropped_no_gene_symbol": 0, "dropped_no_location": 0,
             "dropped_empty": 0, "dropped_duplicate_id": 0}
    kept, seen, locations = [], set(), []
    try:
        with _open_text(fasta) as handle:
            for rec in SeqIO.parse(handle, "fasta"):
                stats["records"] += 1
                seq = str(rec.seq).upper()
                symbol, chrom, start = parse_header(rec.description)
                if symbol is not None and chrom is not None:
                    locations.append((symbol, chrom, start))
                if "*" in seq:
                    stats["dropped_stop_codon"] += 1
                    continue
                if not seq:
                    stats["dropped_empty"] += 1
                    continue
                if symbol is None:
                    stats["dropped_no_gene_symbol"] += 1
                    continue
                if chrom is None:
                    stats["dropped_no_location"] += 1
                    continue
                if rec.id in seen:
                    stats["dropped_duplicate_id"] += 1
                    continue
                seen.add(rec.id)
                kept.append(Protein(rec.id, symbol, chrom, start, seq))
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{fasta}: not a readable (gzip'd) FASTA file ({type(e).__name__}: {e}); "
                        "download the Ensembl pep.all.fa.gz again") from None
    if stats["records"] == 0:
        raise UserError(f"{fasta}: no FASTA records; pass an Ensembl peptide FASTA (<Species>.<assembly>.pep.all.fa.gz)")
    if not kept and stats["dropped_no_gene_symbol"]:
        raise UserError(f"{fasta}: no header has a gene_symbol: field ({stats['records']} records); UCE needs gene "
                        "symbols: use Ensembl's pep.all.fa (headers with gene_symbol:<SYM>)")
    if not kept:
        raise UserError(f"{fasta}: no protein left after dropping stop codons, missing symbols and locations "
                        f"({stats}); pass an Ensembl peptide FASTA")
    stats["proteins"] = len(kept)
    stats["genes"] = len({p.gene_symbol for p in kept})
    return kept, stats, locations


def gene_locations(locations: list[tuple[str, str, int]], species: str) -> pd.DataFrame:
    """gene_symbol,chromosome,start,species: the notebook's table (module doc), one row per upper-cased symbol."""
    where: dict[str, tuple[str, str]] = {}
    for symbol, chrom, start in locations:
        where[symbol.upper()] = (chrom, str(start))  # the last header wins; the position stays the first
    df = pd.DataFrame({"gene_symbol": list(where), "chromosome": [v[0] for v in where.values()],
                       "start": [v[1] for v in where.values()]})
    df = df.sort_values(["chromosome", "start"])  # as strings, as the notebook sorts them
    df["species"] = species
    return df


def write_proteins(proteins: list[Protein], path: Path) -> None:
    df = pd.DataFrame({"protein_id": [p.protein_id for p in proteins], "gene_symbol": [p.gene_symbol for p in proteins],
                       "sequence": [p.sequence for p in proteins]})
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)


def read_proteins(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as e:
        raise UserError(f"{path}: not a proteins table ({type(e).__name__}: {e}); write it with `uce proteome`") from None
    if list(df.columns) != PROTEIN_COLUMNS:
        raise UserError(f"{path}: columns {list(df.columns)}, expected {PROTEIN_COLUMNS}; write it with `uce proteome`")
    return df


def balanced_chunks(lengths: list[int], n: int) -> list[list[int]]:
    """Indices split into n groups of near-equal residue totals (longest first onto the lightest group),
    each group in input order."""
    groups: list[list[int]] = [[] for _ in range(n)]
    totals = [0] * n
    for i in sorted(range(len(lengths)), key=lambda i: (-min(lengths[i], MAX_RESIDUES), i)):
        g = min(range(n), key=lambda k: (totals[k], k))
        groups[g].append(i)
        totals[g] += min(lengths[i], MAX_RESIDUES)
    return [sorted(g) for g in groups]


def fasta_prefix(fasta: Path) -> str:
    """`Gallus_gallus.bGalGal1.mat.broiler.GRCg7b` of `...GRCg7b.pep.all.fa.gz`: the official .pt name stem."""
    name = fasta.name
    for suffix in (".gz", ".fa", ".fasta", ".pep.all"):
        name = name.removesuffix(suffix)
    return name


def build_proteome(fasta: Path, species: str, output_dir: Path, chunks: int = 1) -> dict:
    check_species_name(species)
    proteins, stats, locations = read_proteome(fasta)
    if chunks > len(proteins):
        raise UserError(f"--chunks {chunks}: more chunks than the {len(proteins)} proteins of {fasta}; pass fewer")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_proteins(proteins, output_dir / "proteins.tsv")
    locs = gene_locations(locations, species)
    with atomic_path(output_dir / f"{species}_chrom.csv") as tmp:
        locs.to_csv(tmp, index=False)
    files = []
    if chunks > 1:
        for k, idx in enumerate(balanced_chunks([len(p.sequence) for p in proteins], chunks)):
            files.append(output_dir / f"proteins.chunk-{k:03d}.tsv")
            write_proteins([proteins[i] for i in idx], files[-1])
    stats.update({"species": species, "fasta": str(fasta), "chromosomes": int(locs["chromosome"].nunique()),
                  "chunks": [f.name for f in files],
                  "gene_embeddings_file": f"{fasta_prefix(fasta)}.gene_symbol_to_embedding_ESM2.pt"})
    write_json(output_dir / "proteome.json", stats)
    return stats
