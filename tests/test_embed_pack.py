"""Issue 12: small datasets share EMBED tasks (--embed_pack_cells). `uce embed` over several shards
gives each shard's embeddings exactly as a call of its own; the pipeline packs the one-shard datasets
of a species (sample-id order, at most embed_pack_cells cells a task), leaves multi-shard datasets
one task per shard, resumes every pack, and gives the same X_uce as an unpacked run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import PBMC, run_uce
from nf_utils import (REPO, assert_ok, ensure_demo, fake_model_dir, read_trace, requires_engine, run_pipeline,
                      simple_name)


# ----------------------------------------------------------------------------------------
# `uce embed` with several --sentences
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(model_dir, tmp_path_factory):
    """100 pbmc demo cells as 3 shards of 40, 40 and the rest, and the human species file."""
    import anndata as ad
    d = tmp_path_factory.mktemp("pack_unit")
    ad.read_h5ad(PBMC)[:100].copy().write_h5ad(d / "in.h5ad")
    run_uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--output", d / "h.pt")
    run_uce("preprocess", "--input", d / "in.h5ad", "--species-file", d / "h.pt", "--output", d / "p.h5ad",
            "--stats", d / "s.json")
    run_uce("index", "--adata", d / "p.h5ad", "--species-file", d / "h.pt", "--output", d / "i.npz")
    run_uce("sentences", "--adata", d / "p.h5ad", "--index", d / "i.npz", "--output-dir", d, "--name", "x",
            "--shard-size", 40, "--workers", 1)
    return d, sorted(d.glob("x.shard-*.sentences.npz"))


def test_sentences_write_shard_cell_counts(shards):
    d, files = shards
    counts = json.loads((d / "x.shards.json").read_text())
    kept = json.loads((d / "s.json").read_text())["cells_kept"]
    assert len(files) == 3 and counts == {f.name: len(np.load(f)["cell_index"]) for f in files}
    assert list(counts.values()) == [40, 40, kept - 80]


@pytest.mark.parametrize("compat", ["none", "reference"])
def test_several_sentences_equal_separate_calls(shards, compat, tmp_path, monkeypatch):
    """One call over 3 shards == 3 calls, array for array. A simulated out-of-memory limit makes the
    first shard split its batches: the later shards must not inherit that split (default mode) and
    each records its own split count."""
    d, files = shards
    if compat == "none":
        monkeypatch.setenv("UCE_NF_SIMULATE_GPU_TOKENS", "12000")  # ~11 sentences of this data
    args = ["--species-file", d / "h.pt", "--compat", compat, "--device", "cpu"]
    run_uce("embed", *sum((["--sentences", f, "--output", tmp_path / f"packed.{f.name}"] for f in files), []), *args)
    splits = []
    for f in files:
        run_uce("embed", "--sentences", f, "--output", tmp_path / f"alone.{f.name}", *args)
        packed, alone = np.load(tmp_path / f"packed.{f.name}"), np.load(tmp_path / f"alone.{f.name}")
        assert set(packed.files) == set(alone.files)
        for k in packed.files:
            if k != "seconds":
                assert packed[k].dtype == alone[k].dtype and packed[k].tobytes() == alone[k].tobytes(), (f.name, k)
        splits.append(int(alone["oom_splits"]))
    assert (splits[0] > 0 and splits[1] > 0) == (compat == "none"), splits


def test_sentences_and_outputs_must_pair(shards, tmp_path):
    from click.testing import CliRunner
    from uce_nf.cli import main
    d, files = shards
    res = CliRunner().invoke(main, ["embed", "--sentences", str(files[0]), "--sentences", str(files[1]),
                                    "--output", str(tmp_path / "a.npz"), "--species-file", str(d / "h.pt")])
    assert res.exit_code == 2 and "2 --sentences but 1 --output" in res.output, res.output


# ----------------------------------------------------------------------------------------
# Stub runs: which EMBED tasks the channel graph makes, and -resume
# ----------------------------------------------------------------------------------------
STUB_CONFIG = REPO / "tests" / "config" / "stub_shards.config"  # 1 stub shard of 10 cells, 2 for 'multi*'
SMALL = ["s5", "s3", "s1", "s6", "s2", "s4"]  # not in sample-id order: packs follow the ids


def embed_rows(out: Path, suffix: str) -> dict[str, str]:
    return {r["tag"]: r["status"] for r in read_trace(out, suffix) if simple_name(r) == "EMBED"}


@pytest.fixture(scope="module")
def stub_runs(tmp_path_factory):
    """6 small human datasets, one 2-shard human dataset and one small mouse dataset, packed at 25
    cells (2 stub shards a pack), resumed, then resumed with --embed_pack_cells 0."""
    root = tmp_path_factory.mktemp("pack_stub")
    models = fake_model_dir(root)
    (root / "data").mkdir()
    rows = ["sample,h5ad,species"]
    for s in SMALL[:3] + ["multi", "mouse1"] + SMALL[3:]:
        (root / "data" / f"{s}.h5ad").touch()
        rows.append(f"{s},data/{s}.h5ad,{'mouse' if s == 'mouse1' else 'human'}")
    (root / "sheet.csv").write_text("\n".join(rows) + "\n")
    args = ["-stub-run", "-c", str(STUB_CONFIG), "--input", str(root / "sheet.csv"), "--model_dir", str(models),
            "--skip_multiqc", "--atlas", "false"]
    # one --outdir per run (a run moves an earlier trace of the same outdir away), one work dir
    runs = {"packed": run_pipeline(root, *args, "--embed_pack_cells", "25", "--outdir", str(root / "packed"),
                                   "--trace_report_suffix", "run")}
    runs["resumed"] = run_pipeline(root, *args, "--embed_pack_cells", "25", "--outdir", str(root / "resumed"),
                                   "--trace_report_suffix", "run", "-resume")
    runs["off"] = run_pipeline(root, *args, "--embed_pack_cells", "0", "--outdir", str(root / "off"),
                               "--trace_report_suffix", "run", "-resume")
    return root, runs


@pytest.mark.nextflow
def test_stub_packs_small_datasets(stub_runs):
    root, runs = stub_runs
    assert_ok(runs["packed"])
    out = root / "packed"
    # 6 small human datasets -> 3 packs of 2 in sample-id order; 'multi' one task per shard; the one
    # small mouse dataset a plain task of its own (a pack of one)
    assert embed_rows(out, "run") == {"pack-human-1 (2 datasets)": "COMPLETED", "pack-human-2 (2 datasets)": "COMPLETED",
                                         "pack-human-3 (2 datasets)": "COMPLETED", "multi.shard-00000": "COMPLETED",
                                         "multi.shard-00001": "COMPLETED", "mouse1.shard-00000": "COMPLETED"}
    packs = {}
    for r in read_trace(out, "run"):
        if r["tag"].startswith("pack-"):
            packs[r["tag"].split()[0]] = sorted(p.name for p in Path(r["workdir"]).glob("*.embeddings.npz"))
    assert packs == {f"pack-human-{k + 1}": [f"s{2 * k + 1}.shard-00000.embeddings.npz", f"s{2 * k + 2}.shard-00000.embeddings.npz"]
                     for k in range(3)}
    merged = [r["tag"] for r in read_trace(out, "run") if simple_name(r) == "MERGE"]
    assert sorted(merged) == sorted(SMALL + ["multi", "mouse1"])


@pytest.mark.nextflow
def test_stub_resume_caches_every_pack(stub_runs):
    root, runs = stub_runs
    assert_ok(runs["resumed"])
    assert {r["status"] for r in read_trace(root / "resumed", "run")} == {"CACHED"}
    assert embed_rows(root / "resumed", "run") == {tag: "CACHED" for tag in embed_rows(root / "packed", "run")}


@pytest.mark.nextflow
def test_stub_packing_off(stub_runs):
    """--embed_pack_cells 0: one task per shard; the unpacked tasks of the packed run stay cached."""
    root, runs = stub_runs
    assert_ok(runs["off"])
    want = {f"{s}.shard-00000": "COMPLETED" for s in SMALL}
    want.update({"multi.shard-00000": "CACHED", "multi.shard-00001": "CACHED", "mouse1.shard-00000": "CACHED"})
    assert embed_rows(root / "off", "run") == want


# ----------------------------------------------------------------------------------------
# Real runs: packed and unpacked give the same embeddings
# ----------------------------------------------------------------------------------------
SLICES = {"p1": (0, 60), "p2": (60, 130), "p3": (130, 210)}
PACK_CELLS = 150  # p1 + p2 packed, p3 a pack of one (a plain task)


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """3 small human datasets (pbmc demo slices of 60-80 cells): packed at 150 cells, then the
    same work dir resumed with --embed_pack_cells 0 into another outdir."""
    import anndata as ad
    ensure_demo()
    root = tmp_path_factory.mktemp("pack_real")
    pbmc = ad.read_h5ad(PBMC)
    rows = ["sample,h5ad,species"]
    for s, (lo, hi) in SLICES.items():
        pbmc[lo:hi].copy().write_h5ad(root / f"{s}.h5ad")
        rows.append(f"{s},{root / f'{s}.h5ad'},human")
    (root / "sheet.csv").write_text("\n".join(rows) + "\n")
    args = ["--input", str(root / "sheet.csv"), "--atlas", "false", "--skip_multiqc"]
    packed = run_pipeline(root, *args, "--outdir", str(root / "packed"), "--embed_pack_cells", str(PACK_CELLS),
                          "--trace_report_suffix", "run")
    assert_ok(packed)
    off = run_pipeline(root, *args, "--outdir", str(root / "off"), "--embed_pack_cells", "0",
                       "--trace_report_suffix", "run", "-resume")
    assert_ok(off)
    return root


def greedy_packs(cells: dict[str, int], limit: int) -> list[list[str]]:
    packs: list[list[str]] = []
    for s in sorted(cells):
        if packs and sum(cells[x] for x in packs[-1]) + cells[s] <= limit:
            packs[-1].append(s)
        else:
            packs.append([s])
    return packs


@pytest.mark.nextflow
@pytest.mark.slow
@requires_engine
def test_packed_equals_unpacked(real_runs):
    import anndata as ad
    root = real_runs
    cells = {s: json.loads((root / "packed" / s / f"{s}.preprocess.json").read_text())["cells_kept"] for s in SLICES}
    packs = greedy_packs(cells, PACK_CELLS)
    assert any(len(p) > 1 for p in packs), (cells, packs)
    tags = embed_rows(root / "packed", "run")
    assert len(tags) == len(packs) < len(SLICES), tags
    assert sum(t.startswith("pack-human-") for t in tags) == sum(len(p) > 1 for p in packs), tags
    off = embed_rows(root / "off", "run")
    assert sorted(off) == [f"{s}.shard-00000" for s in sorted(SLICES)], off
    # only the datasets that were packed embed again; a pack of one was the same task as unpacked
    assert sorted(t for t, st in off.items() if st == "CACHED") == sorted(f"{p[0]}.shard-00000" for p in packs if len(p) == 1)
    for s in SLICES:
        a = ad.read_h5ad(root / "packed" / s / f"{s}_uce_adata.h5ad")
        b = ad.read_h5ad(root / "off" / s / f"{s}_uce_adata.h5ad")
        assert a.n_obs == cells[s] and list(a.obs_names) == list(b.obs_names)
        assert np.array_equal(a.obsm["X_uce"], b.obsm["X_uce"]), s
