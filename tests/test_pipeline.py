"""The Nextflow pipeline, end to end, offline (NXF_OFFLINE=true, local executor, CPU).

A stub run of the whole channel graph first, then real runs on the demo data, shared between
assertions through module-scoped fixtures: a 3-dataset/2-species run (sharded) and its -resume,
a compat-mode run compared with `uce run`. Bad inputs are in test_pipeline_inputs.py;
config, schema and syntax checks in test_pipeline_config.py.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from nf_utils import (MODEL_DIR, MOUSE, PBMC, REPO, assert_ok, ensure_demo, make_fake_inputs, read_trace,
                      requires_engine, run_nf, run_pipeline, simple_name)

pytestmark = pytest.mark.nextflow


# ----------------------------------------------------------------------------------------
# Stub run: the whole channel graph, no engine needed
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stub_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stub")
    sheet, models = make_fake_inputs(root)
    args = ["-stub-run", "--input", str(sheet), "--model_dir", str(models), "--outdir", str(root / "out")]
    first = run_pipeline(root, *args, "--trace_report_suffix", "first")
    second = run_pipeline(root, *args, "--trace_report_suffix", "second", "-resume")
    return root, first, second


def test_stub_run(stub_run):
    root, first, _ = stub_run
    assert_ok(first)
    counts = {}
    for row in read_trace(root / "out", "first"):
        assert row["status"] == "COMPLETED", row
        counts[simple_name(row)] = counts.get(simple_name(row), 0) + 1
    # 3 datasets of 2 species; the stub SENTENCES writes 2 shards per dataset
    assert counts == {"SPECIES_VOCAB": 2, "VALIDATE": 3, "PREPARE_SPECIES": 2, "PREPROCESS": 3, "INDEX": 3, "SENTENCES": 3,
                      "EMBED": 6, "MERGE": 3, "ATLAS": 1, "REPORT": 1, "MULTIQC": 1}
    out = root / "out"
    for s in ("human_a", "human_b", "mouse_c"):
        assert (out / s / f"{s}_uce_adata.h5ad").exists()
        assert not (out / s / f"{s}.summary.json").exists(), "the report summaries are not results"
    assert (out / "report").is_dir()
    assert (out / "atlas" / "uce_atlas.h5ad").is_file() and (out / "atlas" / "atlas_summary.json").is_file()
    assert (out / "multiqc" / "multiqc_report.html").is_file() and (out / "multiqc" / "multiqc_data").is_dir()
    # ATLAS gets every dataset in samplesheet order; REPORT the summaries and the atlas maps, not h5ads
    work = root / "work"
    atlas_sh = next(p for p in work.glob("*/*/.command.sh") if "atlas/uce_atlas.h5ad" in p.read_text())
    staged = sorted((atlas_sh.parent / "adata").iterdir())
    assert [p.name for p in staged] == ["human_a_uce_adata.h5ad", "human_b_uce_adata.h5ad", "mouse_c_uce_adata.h5ad"]
    report_sh = next(p for p in work.glob("*/*/.command.sh") if "report/uce_report.html" in p.read_text())
    staged = [str(p.relative_to(report_sh.parent)) for p in report_sh.parent.rglob("*") if not p.name.startswith(".")
              and p.parent != report_sh.parent / "report"]
    assert not [p for p in staged if p.endswith(".h5ad")], staged
    assert sum(p.endswith(".summary.json") for p in staged) == 3 and "atlas/atlas_summary.json" in staged
    assert not (out / "human_a" / "intermediates").exists(), "intermediates only with --save_intermediates"
    check_pipeline_info(out, "first")


def test_stub_resume_all_cached(stub_run):
    root, first, second = stub_run
    assert_ok(second)
    rows = read_trace(root / "out", "second")
    assert len(rows) == len(read_trace(root / "out", "first"))
    assert {r["status"] for r in rows} == {"CACHED"}


def test_stub_atlas_off_and_single_dataset(stub_run, tmp_path):
    """--atlas false skips ATLAS (MULTIQC still runs), --skip_multiqc skips MULTIQC, and a run of
    one dataset has no atlas to build."""
    root, first, _ = stub_run
    assert_ok(first)
    sheet, models = root / "samplesheet.csv", root / "models"
    r = run_pipeline(tmp_path, "-stub-run", "--input", str(sheet), "--model_dir", str(models), "--outdir",
                     str(tmp_path / "off"), "--atlas", "false", "--trace_report_suffix", "off")
    assert_ok(r)
    names = [simple_name(x) for x in read_trace(tmp_path / "off", "off")]
    assert "ATLAS" not in names and names.count("REPORT") == 1 and names.count("MULTIQC") == 1
    assert not (tmp_path / "off" / "atlas").exists() and (tmp_path / "off" / "multiqc" / "multiqc_report.html").is_file()
    one = tmp_path / "one.csv"
    one.write_text("sample,h5ad,species\nonly,data/a.h5ad,human\n")
    (tmp_path / "data").symlink_to(root / "data")
    r = run_pipeline(tmp_path, "-stub-run", "--input", str(one), "--model_dir", str(models), "--outdir",
                     str(tmp_path / "one"), "--skip_multiqc", "--trace_report_suffix", "one")
    assert_ok(r)
    names = [simple_name(x) for x in read_trace(tmp_path / "one", "one")]
    assert "ATLAS" not in names and "MULTIQC" not in names and names.count("REPORT") == 1


def test_unknown_reference_sample(tmp_path):
    """--reference_samples must name samples of the samplesheet: one line, before any task."""
    sheet, models = make_fake_inputs(tmp_path)
    r = run_pipeline(tmp_path, "-stub-run", "--input", str(sheet), "--model_dir", str(models), "--outdir",
                     str(tmp_path / "out"), "--reference_samples", "human_a,humna_b")
    assert r.returncode != 0 and "Submitted process" not in r.stdout, r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("Invalid parameter: ")]
    assert lines == ["Invalid parameter: --reference_samples: 'humna_b' not in the samplesheet's sample column "
                     "(human_a, human_b, mouse_c); pass sample ids from the samplesheet, comma-separated"], r.stdout
    assert not (tmp_path / "out").exists()


def test_stub_download_model_files(tmp_path):
    """--download_model_files fills --model_dir (which need not exist) and later runs reuse it."""
    sheet, _ = make_fake_inputs(tmp_path)
    models = tmp_path / "downloaded" / "model_files"
    args = ["-stub-run", "--input", str(sheet), "--download_model_files", "--model_dir", str(models),
            "--outdir", str(tmp_path / "out")]
    first = run_pipeline(tmp_path, *args)
    assert_ok(first)
    assert "Submitted process > UCE:DOWNLOAD_MODEL_FILES" in first.stdout
    assert (models / "4layer_model.torch").exists() and (models / "protein_embeddings").is_dir()
    second = run_pipeline(tmp_path, *args)
    assert_ok(second)
    assert "Stored process > UCE:DOWNLOAD_MODEL_FILES" in second.stdout


def check_pipeline_info(out: Path, suffix: str) -> None:
    info = out / "pipeline_info"
    for name in (f"execution_timeline_{suffix}.html", f"execution_report_{suffix}.html",
                 f"execution_trace_{suffix}.txt", f"pipeline_dag_{suffix}.html", f"params_{suffix}.json",
                 "software_versions.yml", "validated.json", "samplesheet.valid.csv"):
        assert (info / name).is_file(), name
    params = json.loads((info / f"params_{suffix}.json").read_text())
    assert params["trace_report_suffix"] == suffix and params["outdir"] == str(out)
    versions = (info / "software_versions.yml").read_text()
    for key in ("VALIDATE:", "PREPARE_SPECIES:", "EMBED:", "MERGE:", "ATLAS:", "REPORT:", "Workflow:", "Nextflow: "):
        assert key in versions, versions


# ----------------------------------------------------------------------------------------
# Real runs on the demo data (700 pbmc cells, 300 mouse cells, synthetic 4-layer model)
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
    """3 datasets of 2 species: pbmc twice (relative and absolute path) and the mouse demo;
    shard_size 300 from the test profile -> several EMBED tasks per dataset."""
    ensure_demo()
    root = tmp_path_factory.mktemp("multi")
    (root / "data").mkdir()
    (root / "data" / "pbmc.h5ad").symlink_to(PBMC)
    sheet = root / "three.csv"
    sheet.write_text(f"sample,h5ad,species\npbmc_a,data/pbmc.h5ad,human\npbmc_b,{PBMC},human\nmouse,{MOUSE},mouse\n")
    args = ["--input", str(sheet), "--outdir", str(root / "out"), "--color_by", "bulk_labels",
            "--reference_samples", "pbmc_a", "--label_column", "bulk_labels"]
    t0 = datetime.now()
    first = run_pipeline(root, *args, "--trace_report_suffix", "first")
    first_s = (datetime.now() - t0).total_seconds()
    t0 = datetime.now()
    second = run_pipeline(root, *args, "--trace_report_suffix", "second", "-resume")
    second_s = (datetime.now() - t0).total_seconds()
    print(f"\nmulti_run: first {first_s:.0f}s, -resume {second_s:.0f}s", file=sys.stderr)
    return root, first, second


@pytest.mark.slow
@requires_engine
def test_multi_dataset_run(multi_run):
    import anndata as ad
    import numpy as np

    root, first, _ = multi_run
    assert_ok(first)
    out = root / "out"
    rows = read_trace(out, "first")
    assert {r["status"] for r in rows} == {"COMPLETED"}
    names = [simple_name(r) for r in rows]
    assert names.count("VALIDATE") == 3  # one per dataset
    assert names.count("SPECIES_VOCAB") == 2 and names.count("PREPARE_SPECIES") == 2  # shared per species
    assert names.count("MERGE") == 3 and names.count("REPORT") == 1 and names.count("ATLAS") == 1

    shards = 0
    for sample, species in (("pbmc_a", "human"), ("pbmc_b", "human"), ("mouse", "mouse")):
        stats = json.loads((out / sample / f"{sample}.preprocess.json").read_text())
        a = ad.read_h5ad(out / sample / f"{sample}_uce_adata.h5ad")
        check_output(a, stats["cells_kept"], species)
        n = math.ceil(stats["cells_kept"] / 300)
        assert a.uns["uce"]["n_shards"] == n
        assert sum(1 for r in rows if simple_name(r) == "EMBED" and r["tag"].startswith(sample + ".shard-")) == n
        shards += n
    assert names.count("EMBED") == shards and shards > 3

    a = ad.read_h5ad(out / "pbmc_a" / "pbmc_a_uce_adata.h5ad")
    b = ad.read_h5ad(out / "pbmc_b" / "pbmc_b_uce_adata.h5ad")
    assert np.array_equal(a.obsm["X_uce"], b.obsm["X_uce"]), "same input and seed -> same embeddings"

    # every VALIDATE gates every later task
    when = lambda r, k: datetime.strptime(r[k], "%Y-%m-%d %H:%M:%S.%f")  # noqa: E731
    validated = max(when(r, "complete") for r in rows if simple_name(r) == "VALIDATE")
    assert all(when(r, "submit") >= validated for r in rows if simple_name(r) not in ("SPECIES_VOCAB", "VALIDATE"))

    assert any((out / "report").glob("*.html")), "report/ has an HTML report"
    check_pipeline_info(out, "first")

    # the atlas: labels from pbmc_a to pbmc_b (scored: it has bulk_labels) and to mouse (not scored:
    # the mouse demo keeps its labels in obs['cell_type'] and no --query_label_column is given here)
    atlas = json.loads((out / "atlas" / "atlas_summary.json").read_text())
    lt = atlas["label_transfer"]
    assert lt["reference_samples"] == ["pbmc_a"] and lt["label_column"] == "bulk_labels"
    assert set(lt["queries"]) == {"pbmc_b", "mouse"}
    b = lt["queries"]["pbmc_b"]
    assert b["n_with_truth"] == b["n"] == atlas["samples"]["pbmc_b"]["n_cells"] and 0 <= b["accuracy"] <= 1
    # the reported accuracy is the one the atlas file's transferred labels give
    obs = ad.read_h5ad(out / "atlas" / "uce_atlas.h5ad", backed="r").obs
    q = obs[obs["sample"] == "pbmc_b"]
    recount = float((q["uce_label_transfer"].astype(str) == q["bulk_labels"].astype(str)).mean())
    assert abs(recount - b["accuracy"]) < 1e-9, (recount, b["accuracy"])
    assert "accuracy" not in lt["queries"]["mouse"]


@pytest.mark.slow
@requires_engine
def test_resume_reuses_every_task(multi_run):
    root, first, second = multi_run
    assert_ok(first)
    assert_ok(second)
    rows1, rows2 = read_trace(root / "out", "first"), read_trace(root / "out", "second")
    assert len(rows2) == len(rows1)
    assert {r["status"] for r in rows2} == {"CACHED"}, [(r["name"], r["status"]) for r in rows2]
    assert sorted(r["hash"] for r in rows2) == sorted(r["hash"] for r in rows1)
    assert "Submitted process" not in second.stdout


def check_output(a, n_cells: int, species: str) -> None:
    import numpy as np

    assert a.n_obs == n_cells
    x = a.obsm["X_uce"]
    assert x.dtype == np.float32 and x.shape[0] == n_cells and np.isfinite(x).all()
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    uce = a.uns["uce"]
    assert uce["species"] == species and int(uce["seed"]) == 0
    # unset --batch_size: the reference's 25 in compat mode, a token budget (recorded as 0) otherwise
    assert int(uce["batch_size"]) == (25 if uce["compat"] == "reference" else 0)
    assert uce["device"] == "cpu" and list(uce["gpu_names"]) == []


@pytest.fixture(scope="module")
def compat_run(tmp_path_factory):
    """The plain test profile (default samplesheet: the pbmc demo, 3 shards, and the mouse demo,
    1 shard; the atlas over both with labels from pbmc to mouse; MultiQC) in compat mode."""
    ensure_demo()
    root = tmp_path_factory.mktemp("compat")
    r = run_pipeline(root, "--outdir", str(root / "out"), "--compat", "reference", "--trace_report_suffix", "run")
    return root, r


def uce_run(out: Path, compat: str) -> Path:
    """The same dataset through `uce run` (one process, one shard)."""
    path = out / f"uce_run_{compat}.h5ad"
    if not path.exists():
        r = subprocess.run([sys.executable, "-m", "uce_nf.cli", "run", "--input", str(PBMC), "--species", "human",
                            "--model-dir", str(MODEL_DIR), "--compat", compat, "--seed", "0", "--batch-size", "25",
                            "--output", str(path)], capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-4000:]
    return path


@pytest.mark.slow
@requires_engine
def test_compat_run_equals_uce_run(compat_run):
    """Sharded pipeline (3 EMBED tasks) == unsharded `uce run`, bit for bit, in compat mode."""
    import anndata as ad
    import numpy as np

    root, r = compat_run
    assert_ok(r)
    out = root / "out"
    rows = read_trace(out, "run")
    assert sum(simple_name(x) == "EMBED" and x["tag"].startswith("pbmc_demo.") for x in rows) == 3
    a = ad.read_h5ad(out / "pbmc_demo" / "pbmc_demo_uce_adata.h5ad")
    stats = json.loads((out / "pbmc_demo" / "pbmc_demo.preprocess.json").read_text())
    check_output(a, stats["cells_kept"], "human")
    assert a.uns["uce"]["compat"] == "reference" and a.uns["uce"]["n_shards"] == 3
    ref = ad.read_h5ad(uce_run(root, "reference"))
    assert list(a.obs_names) == list(ref.obs_names)
    assert np.array_equal(a.obsm["X_uce"], ref.obsm["X_uce"])


@pytest.mark.slow
@requires_engine
def test_demo_atlas_and_multiqc(compat_run):
    """`nextflow run . -profile test`: the atlas over the human and mouse demos (every embedded cell,
    samplesheet order), the report's atlas section, and MultiQC with our content and the versions."""
    import anndata as ad
    import numpy as np

    root, r = compat_run
    assert_ok(r)
    out = root / "out"
    kept = {s: json.loads((out / s / f"{s}.preprocess.json").read_text())["cells_kept"] for s in ("pbmc_demo", "mouse_demo")}
    atlas = ad.read_h5ad(out / "atlas" / "uce_atlas.h5ad")
    assert atlas.n_obs == kept["pbmc_demo"] + kept["mouse_demo"]
    assert list(atlas.obs["sample"]) == ["pbmc_demo"] * kept["pbmc_demo"] + ["mouse_demo"] * kept["mouse_demo"]
    assert list(atlas.obs["species"].unique()) == ["human", "mouse"]
    pbmc = ad.read_h5ad(out / "pbmc_demo" / "pbmc_demo_uce_adata.h5ad")
    np.testing.assert_array_equal(atlas.obsm["X_uce"][:kept["pbmc_demo"]], pbmc.obsm["X_uce"])
    assert atlas.obsm["X_umap"].shape == (atlas.n_obs, 2) and "leiden" in atlas.obs
    assert atlas.obs["uce_label_transfer"][atlas.obs["sample"] == "mouse_demo"].notna().all()
    for f in ("atlas_umap_sample_mqc.png", "atlas_umap_species_mqc.png", "atlas_umap_label_mqc.png",
              "atlas_umap_leiden_mqc.png", "atlas_metrics_mqc.tsv"):
        assert (out / "atlas" / f).stat().st_size > 0, f

    html = (out / "report" / "uce_report.html").read_text()
    assert '<h2 id="atlas">Atlas</h2>' in html and 'id="atlas-holdout"' in html and 'id="atlas-query-mouse_demo"' in html
    assert len(re.findall(r'<img alt="atlas UMAP by', html)) == 4
    assert '<tr id="species-human">' in html and '<tr id="species-mouse">' in html  # the Species section
    summ = json.loads((out / "report" / "uce_summary.json").read_text())
    assert summ["atlas"]["n_cells"] == atlas.n_obs and set(summ["samples"]) == {"pbmc_demo", "mouse_demo"}
    lt = summ["atlas"]["label_transfer"]
    assert 0 <= lt["holdout_accuracy"] <= 1 and lt["reference_samples"] == ["pbmc_demo"]
    # scored against the mouse demo's own labels (conf/test.config: --query_label_column cell_type)
    mouse = lt["queries"]["mouse_demo"]
    assert mouse["n_with_truth"] == kept["mouse_demo"] and 0 <= mouse["accuracy"] <= 1
    assert np.sum(mouse["confusion"]["matrix"]) == kept["mouse_demo"]
    assert 'id="atlas-confusion-mouse_demo"' in html and f"{100 * mouse['accuracy']:.1f}%" in html

    mqc = out / "multiqc" / "multiqc_report.html"
    text = mqc.read_text()
    for s in ("UCE embeddings", "uce_stats", "uce_species", "atlas_umap_sample", "uce_atlas_metrics_table", "Software Versions", "ATLAS",
              "MERGE", "Nextflow"):
        assert s in text, s
    assert (out / "multiqc" / "multiqc_data").is_dir()
    rows = read_trace(out, "run")
    assert [simple_name(x) for x in rows].count("MULTIQC") == 1


@pytest.mark.slow
@requires_engine
def test_default_mode_sharded_equals_unsharded(multi_run):
    """Default mode: pbmc_a (3 EMBED tasks) == `uce run` (one shard)."""
    import anndata as ad
    import numpy as np

    root, first, _ = multi_run
    assert_ok(first)
    a = ad.read_h5ad(root / "out" / "pbmc_a" / "pbmc_a_uce_adata.h5ad")
    ref = ad.read_h5ad(uce_run(root, "none"))
    assert a.uns["uce"]["n_shards"] > 1 and ref.uns["uce"]["n_shards"] == 1
    assert list(a.obs_names) == list(ref.obs_names)
    np.testing.assert_allclose(a.obsm["X_uce"], ref.obsm["X_uce"], rtol=0, atol=1e-6)
