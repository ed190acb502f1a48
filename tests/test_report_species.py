"""The report's Species section (issue 13): per species of the run its origin, vocabulary, chromosomes,
chromosome token offset (and how it was found), gene token ids and checkpoint, from the `species` block
that `uce merge --summary` copies out of the species file; and each dataset's share of matched genes.

Species files are real: `uce prepare-species` on the demo model files (human: offset inferred; mouse:
offset given) and a new species made by `uce species-files` -> `uce species-vocab --source --taxonomy-id`
-> `uce prepare-species --vocab`, as the pipeline makes them. One dataset goes through every step
(preprocess -> index -> sentences -> embed -> `uce merge --summary`); the others are written with the
same write_summary MERGE calls, on h5ads whose gene counts put them either side of the 30% warning."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import MODEL_DIR, PBMC, run_uce
from test_report import DIM, preprocess_stats, text_of, unit, write_output

from uce_nf.report import build_report
from uce_nf.report_species import species_block
from uce_nf.report_summary import write_summary
from uce_nf.species import load_species

CHICKEN_SOURCE = "species sheet: Gallus_gallus.GRCg7b.pep.all.fa.gz + ESM model esm2_tiny"
HUMAN_PE = "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt"


@pytest.fixture(scope="module")
def species_files(model_dir, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("species")
    run_uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--output", d / "human.species.pt")
    run_uce("prepare-species", "--species", "mouse", "--model-dir", model_dir, "--chrom-token-offset", 6304,
            "--output", d / "mouse.species.pt")
    # a new species from gene embeddings and a chromosome csv, as SPECIES_FILES -> SPECIES_VOCAB make it
    csv = pd.read_csv(model_dir / "species_chrom.csv", dtype={"chromosome": str})
    csv = csv[csv["species"] == "human"].assign(species="chicken")[["species", "gene_symbol", "chromosome", "start"]]
    csv.iloc[: len(csv) // 2].to_csv(d / "chicken_chrom.csv", index=False)  # half the genes placed
    run_uce("species-files", "--species", "chicken", "--taxonomy-id", 9031, "--gene-embeddings",
            model_dir / "protein_embeddings" / HUMAN_PE, "--chrom-csv", d / "chicken_chrom.csv", "--special-tokens",
            model_dir / "all_tokens.torch", "--output-dir", d / "chicken")
    run_uce("species-vocab", "--species", "chicken", "--model-dir", d / "chicken", "--source", CHICKEN_SOURCE,
            "--taxonomy-id", 9031, "--output", d / "chicken.vocab.pt")
    run_uce("prepare-species", "--species", "chicken", "--vocab", d / "chicken.vocab.pt", "--model",
            model_dir / "4layer_model.torch", "--output", d / "chicken.species.pt")
    return {"dir": d, **{s: d / f"{s}.species.pt" for s in ("human", "mouse", "chicken")}}


@pytest.fixture(scope="module")
def summaries(species_files, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("summaries")
    # pbmc (human): every step, the summary written by `uce merge --summary`
    ad.read_h5ad(PBMC)[:60].copy().write_h5ad(d / "pbmc.h5ad")
    sf = species_files["human"]
    run_uce("preprocess", "--input", d / "pbmc.h5ad", "--species-file", sf, "--output", d / "pbmc_proc.h5ad",
            "--stats", d / "pbmc.preprocess.json")
    run_uce("index", "--adata", d / "pbmc_proc.h5ad", "--species-file", sf, "--output", d / "pbmc.index.npz")
    run_uce("sentences", "--adata", d / "pbmc_proc.h5ad", "--index", d / "pbmc.index.npz", "--output-dir", d,
            "--name", "pbmc", "--workers", 1)
    run_uce("embed", "--sentences", d / "pbmc.shard-00000.sentences.npz", "--species-file", sf, "--device", "cpu",
            "--output", d / "pbmc.embeddings.npz")
    run_uce("merge", "--adata", d / "pbmc_proc.h5ad", "--embeddings", d / "pbmc.embeddings.npz", "--stats",
            d / "pbmc.preprocess.json", "--species-file", sf, "--output", d / "pbmc_uce_adata.h5ad",
            "--summary", d / "pbmc.summary.json")
    out = {"pbmc": d / "pbmc.summary.json"}
    # the others: MERGE's write_summary on small outputs; genes matched 25% (mouse), 33% and 83% (chicken)
    emb = unit(np.random.default_rng(0).normal(size=(40, DIM)))
    obs = pd.DataFrame(index=[f"c{i}" for i in range(40)])
    for name, species, matched in (("mouse_ds", "mouse", 300), ("chick_a", "chicken", 400), ("chick_b", "chicken", 1000)):
        h5ad = write_output(d / f"{name}_uce_adata.h5ad", emb, obs,
                            preprocess_stats(40, 40, 0, 0, genes_with_embedding=matched, species=species), species=species)
        out[name] = write_summary(h5ad, d / f"{name}.summary.json", species=species_block(load_species(species_files[species])))
    return out


@pytest.fixture(scope="module")
def report(summaries, tmp_path_factory):
    out = tmp_path_factory.mktemp("species_report")
    summ = build_report([], out, summaries=list(summaries.values()))
    return out, summ, (out / "uce_report.html").read_text()


def test_summary_species_block_is_the_species_file(species_files, summaries, model_dir):
    """The block MERGE wrote: scalars only, equal to the species file and to the model files themselves."""
    block = json.loads(summaries["pbmc"].read_text())["species"]
    sf = load_species(species_files["human"])
    assert not any(isinstance(v, (list, dict)) for k, v in block.items() if k != "origin")  # small: no arrays
    assert len(json.dumps(block)) < 1000
    assert block["genes"] == len(sf["symbols"]) == 4000
    csv = pd.read_csv(model_dir / "species_chrom.csv", dtype={"chromosome": str})
    placed = csv[(csv["species"] == "human") & csv["gene_symbol"].str.upper().isin(sf["symbols"])]
    assert block["genes_on_chromosomes"] == int(sf["in_chrom_csv"].sum()) == placed["gene_symbol"].nunique()
    assert block["chromosomes"] == placed["chromosome"].nunique()
    assert block["chrom_token_offset"] == sf["chrom_token_offset"] == 6304
    assert block["chrom_token_offset_how"] == sf["chrom_token_offset_how"] and block["chrom_token_offset_how"].startswith("inferred: ")
    with open(model_dir / "species_offsets.pkl", "rb") as f:
        first = pickle.load(f)["human"]
    assert (block["gene_token_first"], block["gene_token_last"]) == (first, first + 4000 - 1)
    assert block["checkpoint"] == "4layer_model.torch"
    assert block["checkpoint_sha256"] == hashlib.sha256((model_dir / "4layer_model.torch").read_bytes()).hexdigest()
    assert block["origin"] == {"kind": "built-in"}


def test_species_rows(species_files, summaries, report):
    out, summ, html = report
    human = text_of(html, "species-human")
    assert human.startswith("human built-in 4,000 4,000 100.0% ")
    assert "6,304 inferred: the gene blocks of species_offsets.pkl end there" in human
    sha = load_species(species_files["human"])["model"]["sha256"]
    assert f"54–4,053 4layer_model.torch sha256 {sha[:12]}" in human
    st = json.loads((summaries["pbmc"].parent / "pbmc.preprocess.json").read_text())  # what PREPROCESS counted
    g_in, g_emb = st["genes_in"], st["genes_with_embedding"]
    assert human.endswith(f"pbmc {g_emb:,} of {g_in:,} ({100 * g_emb / g_in:.1f}%)")

    mouse = text_of(html, "species-mouse")
    msf = load_species(species_files["mouse"])
    assert mouse.startswith(f"mouse built-in {len(msf['symbols']):,} ")
    assert f"{6304:,} given" in mouse and "mouse_ds 300 of 1,200 (25.0%)" in mouse
    assert 'class="bad">mouse_ds 300 of 1,200' in html  # flagged, like the warning above the tables
    assert any("only 300 of 1200 genes (25%)" in w for w in summ["samples"]["mouse_ds"]["warnings"])

    chicken = text_of(html, "species-chicken")
    csf = load_species(species_files["chicken"])
    n = len(csf["symbols"])
    info = json.loads((species_files["dir"] / "chicken" / "species_files.json").read_text())
    assert csf["chrom_token_offset"] == 4 + n == info["chrom_token_offset"]
    assert chicken.startswith(f"chicken new {CHICKEN_SOURCE} · taxonomy id 9031 {n:,} {int(csf['in_chrom_csv'].sum()):,} ")
    assert f"{4 + n:,} inferred: " in chicken and f" 4–{4 + n - 1:,} " in chicken
    assert "chick_a 400 of 1,200 (33.3%)" in chicken and "chick_b 1,000 of 1,200 (83.3%)" in chicken
    assert 'class="bad">chick_' not in html and not summ["samples"]["chick_a"]["warnings"]

    # uce_summary.json and the MultiQC table carry the same rows
    rows = {r["species"]: r for r in summ["species"]}
    assert [d["name"] for d in rows["chicken"]["datasets"]] == ["chick_a", "chick_b"]
    assert rows["chicken"]["taxonomy_id"] == 9031 and rows["chicken"]["origin"] == "new"
    mqc = json.loads((out / "uce_species_mqc.json").read_text())
    assert mqc["plot_type"] == "table" and set(mqc["data"]) == {"human", "mouse", "chicken"}
    assert mqc["data"]["chicken"]["chrom_token_offset"] == 4 + n and mqc["data"]["mouse"]["offset_how"] == "given"
    assert mqc["data"]["mouse"]["min_matched_pct"] == 25.0 and mqc["data"]["human"]["gene_tokens"] == "54–4,053"
    assert all(set(r) <= set(mqc["headers"]) for r in mqc["data"].values())


def test_old_summaries_and_species_files_still_render(species_files, summaries, tmp_path):
    """A summary without the block (older MERGE), and a species file without origin and offset method
    (older prepare-species): the report renders and says "not recorded"."""
    old = tmp_path / "old.summary.json"
    info = json.loads(summaries["pbmc"].read_text())
    del info["species"]
    old.write_text(json.dumps(info))
    shutil.copy(summaries["pbmc"].with_suffix(".npz"), old.with_suffix(".npz"))
    sf = load_species(species_files["human"])
    del sf["origin"], sf["chrom_token_offset_how"]
    older = write_summary(summaries["pbmc"].parent / "pbmc_uce_adata.h5ad", tmp_path / "older.summary.json",
                          species=species_block(sf))
    for name, summary in (("old", old), ("older", older)):
        summ = build_report([], tmp_path / name, summaries=[summary])
        html = (tmp_path / name / "uce_report.html").read_text()
        row = text_of(html, "species-human")
        if name == "old":
            assert row.startswith("human not recorded not recorded: the summaries of these datasets carry no species")
            assert summ["species"][0]["recorded"] is False
        else:
            assert row.startswith("human not recorded 4,000 ") and "6,304 how: not recorded" in row
        mqc = json.loads((tmp_path / name / "uce_species_mqc.json").read_text())
        assert mqc["data"]["human"]["origin"] == "not recorded"
