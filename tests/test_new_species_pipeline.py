"""New species in the pipeline (issue 13): `-profile test,new_species` embeds the human demo and a
species built in the same run from an Ensembl-format FASTA with a tiny random ESM2
(assets/demo/new_species/, scripts/make_new_species_demo.py); species-sheet checks at launch; a
precomputed protein_embeddings row skips ESM2 (stub run: wiring only)."""

from __future__ import annotations

import json
import pickle
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from nf_utils import (DEMO, MODEL_DIR, REPO, assert_ok, make_fake_inputs, read_trace, requires_engine, run_pipeline,
                      simple_name)

NEW = DEMO / "new_species"
SPECIES, TAXON = "demofish", 7955


def test_groovy_builtin_species_are_the_official_ones():
    from uce_nf.model_files import PROTEIN_EMBEDDING_FILES
    text = (REPO / "subworkflows/local/utils_species_sheet/main.nf").read_text()
    listed = re.search(r"def builtinSpecies\(\) \{\s*return \[([^\]]*)\]", text).group(1)
    assert sorted(re.findall(r"'([a-z_]+)'", listed)) == sorted(PROTEIN_EMBEDDING_FILES)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_species")
    args = ["--outdir", str(root / "out")]
    first = run_pipeline(root, *args, "--trace_report_suffix", "first", profile="test,new_species", timeout=3000)
    second = run_pipeline(root, *args, "--trace_report_suffix", "second", "-resume", profile="test,new_species",
                          timeout=1500)
    return root / "out", first, second


@requires_engine
def test_human_and_new_species_embedded_in_one_run(full_run):
    out, first, _ = full_run
    assert_ok(first)
    counts = {}
    for row in read_trace(out, "first"):
        assert row["status"] == "COMPLETED", row
        counts[simple_name(row)] = counts.get(simple_name(row), 0) + 1
    assert counts["PROTEOME"] == 1 and counts["ESM_EMBED"] == 2 and counts["GENE_EMBEDDINGS"] == 1
    assert counts["SPECIES_FILES"] == 1 and counts["PREPARE_SPECIES"] == 2 and counts["MERGE"] == 2
    for sample, n_min in (("pbmc_demo", 600), ("fish_demo", 80)):
        a = ad.read_h5ad(out / sample / f"{sample}_uce_adata.h5ad")
        emb = a.obsm["X_uce"]
        assert emb.shape[0] >= n_min and np.isfinite(emb).all(), sample
        assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    fish = ad.read_h5ad(out / "fish_demo" / "fish_demo_uce_adata.h5ad")
    assert fish.obs_names[0].startswith("fishcell")
    # the two groups of fish cells (different expression) are told apart by the embedding
    emb, grp = fish.obsm["X_uce"], fish.obs["group"].to_numpy()
    assert np.linalg.norm(emb[grp == "a"].mean(0) - emb[grp == "b"].mean(0)) > 1e-3


@requires_engine
def test_new_species_files_follow_the_recipe(full_run):
    out, first, _ = full_run
    assert_ok(first)
    d = out / "new_species" / SPECIES
    genes = torch.load(d / "Demo_fishus.DemoAsm1.gene_symbol_to_embedding_ESM2.pt", weights_only=True)
    n_genes = len(genes)
    chrom = pd.read_csv(d / "species_chrom.csv", dtype={"chromosome": str})
    assert list(chrom.columns) == ["gene_symbol", "chromosome", "start", "species"]
    n_chrom = chrom["chromosome"].nunique()
    table = torch.load(d / "all_tokens.torch", weights_only=True)
    assert table.shape == (4 + n_genes + n_chrom, 32)
    assert torch.equal(table[:4], torch.load(MODEL_DIR / "all_tokens.torch", weights_only=True)[:4])
    assert torch.equal(table[4:4 + n_genes], torch.stack(list(genes.values())))
    torch.manual_seed(TAXON)
    assert torch.equal(table[4 + n_genes:], torch.normal(0, 1, size=(n_chrom, 32)))
    with open(d / "species_offsets.pkl", "rb") as f:
        assert pickle.load(f) == {SPECIES: 4}
    info = json.loads((d / "species_files.json").read_text())
    assert info["chrom_token_offset"] == 4 + n_genes and info["genes"] == n_genes
    assert "Demo_fishus.DemoAsm1.pep.all.fa.gz" in info["source"] and "esm2_tiny" in info["source"]
    # the FASTA's isoforms were averaged: dfg001 has 3 proteins, the stop-codon gene none
    assert "dfg001" in genes and "stopg1" not in genes and "si:ch211-1a2.3" in genes


@requires_engine
def test_report_species_section(full_run):
    """The report's Species section, from MERGE's summaries: human built in; the new species with the
    sheet's FASTA, ESM model and taxonomy id, and the numbers its species files record."""
    out, first, _ = full_run
    assert_ok(first)
    rows = {r["species"]: r for r in json.loads((out / "report" / "uce_summary.json").read_text())["species"]}
    assert set(rows) == {"human", SPECIES} and rows["human"]["origin"] == "built-in"
    fish, info = rows[SPECIES], json.loads((out / "new_species" / SPECIES / "species_files.json").read_text())
    assert fish["origin"] == "new" and fish["taxonomy_id"] == TAXON
    assert "Demo_fishus.DemoAsm1.pep.all.fa.gz" in fish["source"] and "esm2_tiny" in fish["source"]
    assert fish["genes"] == info["genes"] and fish["chrom_token_offset"] == info["chrom_token_offset"] == 4 + info["genes"]
    assert fish["chrom_token_offset_how"].startswith("inferred: ") and 0 < fish["chromosomes"] <= info["chromosomes"]
    assert (fish["gene_token_first"], fish["gene_token_last"]) == (4, 3 + info["genes"])
    assert [d["name"] for d in fish["datasets"]] == ["fish_demo"] and fish["datasets"][0]["share"] > 0
    html = (out / "report" / "uce_report.html").read_text()
    assert f'<tr id="species-{SPECIES}">' in html and "taxonomy id 7955" in html
    assert "uce_species" in (out / "multiqc" / "multiqc_report.html").read_text()


@requires_engine
def test_resume_reruns_nothing(full_run):
    out, _, second = full_run
    assert_ok(second)
    rows = read_trace(out, "second")
    assert rows and {r["status"] for r in rows} == {"CACHED"}, [(r["name"], r["status"]) for r in rows]
    assert sum(simple_name(r) == "ESM_EMBED" for r in rows) == 2


def _stub_inputs(root, precomputed: bool):
    sheet, models = make_fake_inputs(root)
    (root / "x.pep.all.fa").write_text(">P1 pep chromosome:A:1:1:9:1 gene_symbol:G1\nMKV\n")
    pe = ""
    if precomputed:
        (root / "x.pt").touch()
        pe = ",x.pt"
    (root / "species.csv").write_text(f"species,fasta,taxonomy_id{',protein_embeddings' if precomputed else ''}\n"
                                      f"newfish,x.pep.all.fa,7955{pe}\n")
    sheet.write_text(sheet.read_text() + "fish_d,data/b.h5ad,newfish\n")
    return ["-stub-run", "--input", str(sheet), "--model_dir", str(models), "--outdir", str(root / "out"),
            "--species_sheet", str(root / "species.csv"), "--trace_report_suffix", "t"]


@pytest.mark.parametrize("precomputed", [True, False])
def test_stub_precomputed_embeddings_skip_esm(tmp_path, precomputed):
    args = _stub_inputs(tmp_path, precomputed)
    if not precomputed:
        (tmp_path / "esm").mkdir()
        (tmp_path / "esm" / "config.json").write_text("{}")
        args += ["--esm_model", str(tmp_path / "esm")]
    r = run_pipeline(tmp_path, *args)
    assert_ok(r)
    counts = {}
    for row in read_trace(tmp_path / "out", "t"):
        counts[simple_name(row)] = counts.get(simple_name(row), 0) + 1
    esm = 0 if precomputed else 1
    assert counts.get("ESM_EMBED", 0) == esm and counts.get("GENE_EMBEDDINGS", 0) == esm
    assert counts["PROTEOME"] == 1 and counts["SPECIES_FILES"] == 1
    assert counts["PREPARE_SPECIES"] == 3 and counts["MERGE"] == 4  # human, mouse, newfish
    assert (tmp_path / "out" / "fish_d" / "fish_d_uce_adata.h5ad").exists()


@pytest.mark.parametrize("case,words", [
    ("builtin", "species 'mouse' is one of the 8 built-in UCE species"),
    ("taxonomy", "taxonomy_id 'chicken' is not a positive integer"),
    ("duplicate", "duplicate species 'newfish' (first on line 2)"),
    ("column", "missing required column 'taxonomy_id'"),
    ("fasta", "fasta file not found"),
    ("esm_model", "--esm_model is required: species newfish"),
])
def test_species_sheet_errors_are_one_line_at_launch(tmp_path, case, words):
    args = _stub_inputs(tmp_path, precomputed=case != "esm_model")
    sheet = tmp_path / "species.csv"
    rows = sheet.read_text().splitlines()
    if case == "builtin":
        rows[1] = rows[1].replace("newfish", "mouse")
    elif case == "taxonomy":
        rows[1] = rows[1].replace("7955", "chicken")
    elif case == "duplicate":
        rows.append(rows[1])
    elif case == "column":
        rows = [r.rsplit(",", 2)[0] + "," + r.rsplit(",", 1)[1] for r in rows]  # drop taxonomy_id
    elif case == "fasta":
        rows[1] = rows[1].replace("x.pep.all.fa", "missing.fa")
    sheet.write_text("\n".join(rows) + "\n")
    r = run_pipeline(tmp_path, *args)
    assert r.returncode != 0
    lines = [ln for ln in r.stdout.splitlines() if words in ln]
    assert lines, r.stdout[-3000:]
    assert str(sheet) in lines[0] or case == "esm_model"
    assert not (tmp_path / "out" / "fish_d").exists()
