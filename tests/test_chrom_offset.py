"""--chrom-token-offset follows the reference (uce-reference.md §2, §3.3): 143574 with the checkpoint's
own table, given or proven by the layout for a replaced token file, and impossible values rejected in
one line. And a species file only embeds with the checkpoint it was prepared for."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from conftest import PBMC, run_uce
from official_layout import write_official_layout

from uce_nf.cli import main


def uce(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def offset_of(species_file: Path) -> int:
    return int(torch.load(species_file, weights_only=False)["chrom_token_offset"])


def how_of(species_file: Path) -> str:
    """How the offset was found, as the species file records it for the report."""
    return torch.load(species_file, weights_only=False)["chrom_token_offset_how"]


@pytest.fixture(scope="module")
def official(model_dir, tmp_path_factory):
    dest = tmp_path_factory.mktemp("official")
    write_official_layout(model_dir, dest)
    return dest


def test_checkpoint_table_uses_the_reference_default(official, tmp_path):
    run_uce("prepare-species", "--species", "human", "--model-dir", official, "--output", tmp_path / "h.pt")
    assert offset_of(tmp_path / "h.pt") == 143_574
    assert how_of(tmp_path / "h.pt") == "reference default (the checkpoint's token table)"


def test_replaced_token_file_offset_inferred_only_where_the_layout_proves_it(model_dir, tmp_path):
    run_uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--output", tmp_path / "h.pt")
    assert offset_of(tmp_path / "h.pt") == 6304  # 4 special rows + 6,300 gene rows; then 64 chromosome rows
    assert how_of(tmp_path / "h.pt").startswith("inferred: the gene blocks of species_offsets.pkl end there")

    # Ten more rows than the layout explains: the offset can no longer be inferred.
    tokens = torch.load(model_dir / "all_tokens.torch")
    torch.save(torch.cat([tokens, torch.randn(10, tokens.shape[1])]), tmp_path / "longer.torch")
    code, out = uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--token-file",
                    tmp_path / "longer.torch", "--output", tmp_path / "x.pt")
    assert code == 2 and "--chrom_token_offset is required" in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "x.pt").exists()
    run_uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--token-file", tmp_path / "longer.torch",
            "--chrom-token-offset", 6314, "--output", tmp_path / "y.pt")
    assert offset_of(tmp_path / "y.pt") == 6314 and how_of(tmp_path / "y.pt") == "given"


def staged_vocab(model_dir: Path, out: Path, token_file: Path, others: bool) -> tuple[int, str]:
    """`uce species-vocab` as SPECIES_VOCAB calls it: explicit files, no folder; the other species'
    protein embeddings as --other-protein-embedding (the workflow stages them unless the offset is given)."""
    pe = {p.name: p for p in (model_dir / "protein_embeddings").glob("*.pt")}
    from uce_nf.model_files import PROTEIN_EMBEDDING_FILES
    other_args = [a for sp, name in PROTEIN_EMBEDDING_FILES.items() if sp != "human" and name in pe
                  for a in ("--other-protein-embedding", f"{sp}={pe[name]}")] if others else []
    return uce("species-vocab", "--species", "human", "--spec-chrom-csv", model_dir / "species_chrom.csv",
               "--offset-pkl", model_dir / "species_offsets.pkl", "--token-file", token_file,
               "--protein-embedding", pe[PROTEIN_EMBEDDING_FILES["human"]], *other_args, "--output", out)


def test_pipeline_vocab_proves_the_offset_from_every_species_or_asks_for_it(model_dir, tmp_path):
    """Human's block is not the last one in the demo's offsets. With every species' file the offset is
    proven (6304, as from the model folder); with human's file alone it is not, and nothing is assumed:
    the old pipeline took the last block to end where the chromosome rows begin, which is silently wrong
    for a token file with more chromosome rows than the csv has categories (the official layout has 1,895)."""
    assert staged_vocab(model_dir, tmp_path / "a.pt", model_dir / "all_tokens.torch", others=True)[0] == 0
    assert int(torch.load(tmp_path / "a.pt", weights_only=False)["chrom_token_offset"]) == 6304

    code, out = staged_vocab(model_dir, tmp_path / "b.pt", model_dir / "all_tokens.torch", others=False)
    assert code == 2 and "--chrom_token_offset is required" in out and "not found" in out, out
    assert len(out.strip().splitlines()) == 1 and not (tmp_path / "b.pt").exists()

    # 30 extra chromosome rows after the 64 the csv explains: the old inference gave 6334, silently.
    tokens = torch.load(model_dir / "all_tokens.torch")
    torch.save(torch.cat([tokens, torch.randn(30, tokens.shape[1])]), tmp_path / "more_chrom.torch")
    for others in (True, False):
        code, out = staged_vocab(model_dir, tmp_path / "c.pt", tmp_path / "more_chrom.torch", others=others)
        assert code == 2 and "--chrom_token_offset is required" in out, out
        assert ("94 rows, not one per chromosome category (64)" in out) == others, out


def test_notebook_layout_one_species_offset_is_four_plus_genes(model_dir, tmp_path):
    """The new-species notebook's files: {species: 4}, rows 0-3 special, the species' genes, then one
    row per chromosome of a csv holding that species only."""
    d = tmp_path / "chicken"
    (d / "protein_embeddings").mkdir(parents=True)
    pe_file = "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt"
    shutil.copy(model_dir / "protein_embeddings" / pe_file, d / "protein_embeddings" / "chicken.pt")
    (d / "new_species_protein_embeddings.csv").write_text("species,path\nchicken,chicken.pt\n")
    genes = list(dict.fromkeys(k.upper() for k in torch.load(d / "protein_embeddings" / "chicken.pt")))
    csv = pd.read_csv(model_dir / "species_chrom.csv", dtype={"chromosome": str})
    csv = csv[csv["species"] == "human"].assign(species="chicken")
    csv.to_csv(d / "species_chrom.csv", index=False)
    n_chrom = csv["chromosome"].nunique()
    old = torch.load(model_dir / "all_tokens.torch")
    torch.save(torch.cat([old[:4], torch.randn(len(genes) + n_chrom, old.shape[1])]), d / "all_tokens.torch")
    with open(d / "species_offsets.pkl", "wb") as f:
        pickle.dump({"chicken": 4}, f)
    shutil.copy(model_dir / "4layer_model.torch", d / "4layer_model.torch")
    run_uce("prepare-species", "--species", "chicken", "--model-dir", d, "--output", tmp_path / "c.pt")
    assert offset_of(tmp_path / "c.pt") == 4 + len(genes)


@pytest.mark.parametrize("offset,words", [
    (100, "lands inside the gene rows"),      # human genes are rows 54..4053
    (4000, "lands inside the gene rows"),
    (6360, "token table has 6368 rows"),      # human chromosome codes go up to 27
])
def test_impossible_offsets_are_one_line_errors(model_dir, tmp_path, offset, words):
    for cmd in (["prepare-species", "--output", tmp_path / "h.pt"],
                ["run", "--input", PBMC, "--output", tmp_path / "out.h5ad"]):
        code, out = uce(*cmd, "--species", "human", "--model-dir", model_dir, "--chrom-token-offset", offset)
        assert code == 2, out
        assert words in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "h.pt").exists() and not (tmp_path / "out.h5ad").exists()


def test_species_file_of_another_checkpoint_is_refused(model_dir, tmp_path):
    """A 4-layer species file with another checkpoint of the same width used to embed silently."""
    sd = torch.load(model_dir / "4layer_model.torch")
    sd["encoder.0.weight"] = sd["encoder.0.weight"] * 1.5
    torch.save(sd, tmp_path / "33l_8ep_1024t_1280.torch")
    sf = tmp_path / "human.species.pt"
    run_uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--output", sf)
    run_uce("preprocess", "--input", PBMC, "--species-file", sf, "--output", tmp_path / "p.h5ad", "--stats", tmp_path / "s.json")
    run_uce("index", "--adata", tmp_path / "p.h5ad", "--species-file", sf, "--output", tmp_path / "i.npz")
    run_uce("sentences", "--adata", tmp_path / "p.h5ad", "--index", tmp_path / "i.npz", "--output-dir", tmp_path,
            "--name", "x", "--shard-size", 10**6)
    shard = next(tmp_path.glob("x.shard-*.sentences.npz"))
    code, out = uce("embed", "--sentences", shard, "--species-file", sf, "--model-dir", model_dir,
                    "--model", tmp_path / "33l_8ep_1024t_1280.torch", "--output", tmp_path / "e.npz")
    assert code == 2, out
    assert "prepared for checkpoint 4layer_model.torch" in out and "33l_8ep_1024t_1280.torch" in out, out
    assert len(out.strip().splitlines()) == 1 and not (tmp_path / "e.npz").exists()
    run_uce("embed", "--sentences", shard, "--species-file", sf, "--model-dir", model_dir, "--output", tmp_path / "e.npz")
    assert (tmp_path / "e.npz").exists()


@pytest.mark.nextflow
def test_pipeline_stops_at_validate_on_an_impossible_offset(tmp_path):
    """--chrom_token_offset inside the gene rows: one line from VALIDATE, before any heavy task."""
    from nf_utils import run_pipeline
    r = run_pipeline(tmp_path, "--outdir", str(tmp_path / "out"), "--chrom_token_offset", "100")
    assert r.returncode != 0, r.stdout[-3000:]
    first = next(line for line in r.stdout.splitlines() if "VALIDATE: sample" in line)
    assert "'pbmc_demo'" in first and "--chrom_token_offset 100 lands inside the gene rows" in first, first
    started = {sh.read_text().split("uce-", 1)[1].split()[0] for sh in (tmp_path / "work").glob("*/*/.command.sh")
               if "uce-" in sh.read_text()}
    assert started == {"species-vocab", "validate"}, started


def test_species_file_carries_the_weights_embed_needs(model_dir, tmp_path):
    """EMBED needs no checkpoint: the species file holds the weights (no token table, no training heads),
    and embedding with them equals embedding with the checkpoint."""
    import numpy as np
    sf = tmp_path / "h.pt"
    run_uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--output", sf)
    weights = torch.load(sf, weights_only=False)["weights"]
    assert "pe_embedding.weight" not in weights and not any(k.startswith("binary_decoder") for k in weights)
    run_uce("preprocess", "--input", PBMC, "--species-file", sf, "--output", tmp_path / "p.h5ad", "--stats", tmp_path / "s.json")
    run_uce("index", "--adata", tmp_path / "p.h5ad", "--species-file", sf, "--output", tmp_path / "i.npz")
    run_uce("sentences", "--adata", tmp_path / "p.h5ad", "--index", tmp_path / "i.npz", "--output-dir", tmp_path,
            "--name", "x", "--shard-size", 10**6)
    shard = next(tmp_path.glob("x.shard-*.sentences.npz"))
    run_uce("embed", "--sentences", shard, "--species-file", sf, "--output", tmp_path / "a.npz")
    run_uce("embed", "--sentences", shard, "--species-file", sf, "--model-dir", model_dir, "--output", tmp_path / "b.npz")
    assert np.array_equal(np.load(tmp_path / "a.npz")["embeddings"], np.load(tmp_path / "b.npz")["embeddings"])
