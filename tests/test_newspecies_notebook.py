"""Notebook equivalence (issue 13, item 5): given the same per-gene embeddings and taxonomy id, our
species files are identical to what the UCE notebook's steps (`data_proc/Create New Species
Files.ipynb`) produce, and embedding a dataset with ours (--compat reference) equals the reference
(uce-model 0.1.4) run on the notebook's files with the notebook's --CHROM_TOKEN_OFFSET.

The notebook's steps are written here from the recipe's facts, independently of uce_nf: read the
FASTA's header lines; a symbol is everything after the first colon of the `gene_symbol` field; the
location field is `chromosome:`, else `primary_assembly:`, else `scaffold:`
(`<assembly>:<name>:<start>:...`); a later header of a symbol overwrites the earlier one; the table is
upper-cased symbols, chromosome, start (a string), sorted by (chromosome, start), then the species
column; token file = rows 0-3 of all_tokens.torch, the embedding dict's values in order, then
N_UNIQ_CHROM rows of torch.normal(0, 1) right after torch.manual_seed(taxonomy id); offsets
{species: 4}; CHROM_TOKEN_OFFSET = the rows before the chromosome rows. The reference reads a new
species' embeddings only after the user adds it to its species -> file dicts (the notebook says so;
0.1.4 has the new_species csv reading commented out); that edit is done here with monkeypatch.
"""

from __future__ import annotations

import gzip
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_uce
from nf_utils import DEMO, MODEL_DIR
from reference_oracle import model_argv, reference_args, run_reference
from test_parity import _compare, _ours

FASTA = DEMO / "new_species" / "Demo_fishus.DemoAsm1.pep.all.fa.gz"
H5AD = DEMO / "new_species" / "fish_demo.h5ad"
SPECIES, TAXON = "demofish", 7955
PE_NAME = "Demo_fishus.DemoAsm1.gene_symbol_to_embedding_ESM2.pt"


def notebook_chrom_table(fasta, species) -> pd.DataFrame:
    to_start, to_chrom = {}, {}
    with gzip.open(fasta, "rt") as f:
        for line in f:
            if not line.startswith(">"):
                continue
            fields = line.split()
            sym = [t for t in fields if t.startswith("gene_symbol")]
            if not sym:
                continue
            sym = ":".join(sym[0].split(":")[1:])
            loc = None
            for kind in ("chromosome:", "primary_assembly:", "scaffold:"):
                hit = [t for t in fields if t.startswith(kind)]
                if hit:
                    loc = hit[0].replace(kind, "")
                    break
            if loc is not None:
                to_start[sym] = loc.split(":")[2]
                to_chrom[sym] = loc.split(":")[1]
    df = pd.DataFrame()
    df["gene_symbol"] = [s.upper() for s in to_chrom]
    df["chromosome"] = list(to_chrom.values())
    df["start"] = list(to_start.values())
    df = df.sort_values(["chromosome", "start"])
    df["species"] = species
    return df


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same gene embeddings for both sides: seeded vectors for every symbol of the FASTA
    (as a published .pt would hold), then the notebook's files and ours."""
    w = tmp_path_factory.mktemp("notebook")
    table = notebook_chrom_table(FASTA, SPECIES)
    g = torch.Generator().manual_seed(42)
    symbols = [s for s in pd.Series([ln.split("gene_symbol:")[1].split()[0] for ln in gzip.open(FASTA, "rt")
                                     if ln.startswith(">") and "gene_symbol:" in ln]).drop_duplicates()]
    genes = {s: torch.randn(32, generator=g) for s in symbols}
    pe = w / PE_NAME
    torch.save(genes, pe)

    nb = w / "notebook"  # the notebook's files, in the layout reference_args reads
    (nb / "protein_embeddings").mkdir(parents=True)
    for f in (MODEL_DIR / "protein_embeddings").iterdir():  # the reference loads the 8 built-in files too
        (nb / "protein_embeddings" / f.name).symlink_to(f)
    (nb / "protein_embeddings" / PE_NAME).symlink_to(pe)
    (nb / "4layer_model.torch").symlink_to(MODEL_DIR / "4layer_model.torch")
    table.to_csv(nb / "species_chrom.csv", index=False)
    all_pe = torch.load(MODEL_DIR / "all_tokens.torch")[0:4]
    offsets = {SPECIES: len(all_pe)}
    all_pe = torch.vstack((all_pe, torch.stack(list(torch.load(pe).values()))))
    chrom_token_offset = all_pe.shape[0]
    torch.manual_seed(TAXON)
    all_pe = torch.vstack((all_pe, torch.normal(mean=0, std=1, size=(table["chromosome"].nunique(), 32))))
    torch.save(all_pe, nb / "all_tokens.torch")
    with open(nb / "species_offsets.pkl", "wb") as f:
        pickle.dump(offsets, f)

    ours = w / "ours"
    run_uce("proteome", "--fasta", FASTA, "--species", SPECIES, "--output-dir", w / "prot")
    run_uce("species-files", "--species", SPECIES, "--taxonomy-id", TAXON, "--gene-embeddings", pe,
            "--chrom-csv", w / "prot" / f"{SPECIES}_chrom.csv", "--special-tokens", MODEL_DIR / "all_tokens.torch",
            "--checkpoint", MODEL_DIR / "4layer_model.torch", "--output-dir", ours)
    return {"nb": nb, "ours": ours, "offset": chrom_token_offset, "w": w}


def test_species_files_identical_to_the_notebooks(files):
    nb, ours = files["nb"], files["ours"]
    assert (ours / "species_chrom.csv").read_bytes() == (nb / "species_chrom.csv").read_bytes()
    assert torch.equal(torch.load(ours / "all_tokens.torch"), torch.load(nb / "all_tokens.torch"))
    assert (ours / "species_offsets.pkl").read_bytes() == (nb / "species_offsets.pkl").read_bytes() or \
        pickle.loads((ours / "species_offsets.pkl").read_bytes()) == pickle.loads((nb / "species_offsets.pkl").read_bytes())
    assert json.loads((ours / "species_files.json").read_text())["chrom_token_offset"] == files["offset"]


@pytest.mark.parametrize("seed,batch_size", [(0, 25), (3, 8)])
def test_embeddings_equal_the_reference_on_the_notebooks_files(files, seed, batch_size, tmp_path, monkeypatch):
    import uce.evaluate
    original = uce.evaluate.get_species_to_pe

    def with_new_species(embedding_dir):  # the user's edit of the dict, as the notebook asks
        out = original(embedding_dir)
        out[SPECIES] = {k.upper(): v for k, v in torch.load(f"{embedding_dir}/{PE_NAME}").items()}
        return out

    monkeypatch.setattr(uce.evaluate, "get_species_to_pe", with_new_species)
    from uce.data_proc import gene_embeddings as ge  # the same edit in the preprocessing's dict
    monkeypatch.setitem(ge.MODEL_TO_SPECIES_TO_GENE_EMBEDDING_PATH["ESM2"], SPECIES, ge.EMBEDDING_DIR / PE_NAME)
    info = json.loads((MODEL_DIR.parent / "demo_info.json").read_text())["model_files"]
    args = reference_args(H5AD, files["nb"], tmp_path / "ref", species=SPECIES, batch_size=batch_size,
                          user_argv=model_argv(info) + ["--CHROM_TOKEN_OFFSET", files["offset"]])
    ref = run_reference(args, seed)
    ours = _ours(H5AD, files["ours"], tmp_path, seed, batch_size, species=SPECIES)
    cos, _ = _compare(ref, ours, f"{SPECIES} seed {seed} batch {batch_size}")
    assert len(cos) >= 80
