"""`uce report`: HTML report, MultiQC custom content and JSON summary over final outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from uce_nf.cli import main
from uce_nf.report import default_color_column, mean_pairwise_cosine
from uce_nf.report_trace import parse_duration, parse_memory

DIM = 64


def preprocess_stats(cells_in, kept, min_genes, zero, **kw) -> dict:
    st = {"input": "x.h5ad", "counts_source": "X", "gene_symbols_from": "var_names", "cells_in": cells_in,
          "cells_kept": kept, "cells_dropped_min_genes": min_genes, "cells_dropped_zero_counts": zero,
          "genes_in": 1200, "genes_after_min_cells": 900, "genes_with_embedding": 1000, "genes_kept": 850,
          "duplicate_obs_names": 0, "duplicate_gene_symbols": 0, "filter": True, "min_cells": 10, "min_genes": 25,
          "seconds": 1.25, "species": "human"}
    st.update(kw)
    return st


def write_output(path: Path, emb: np.ndarray, obs: pd.DataFrame, stats: dict, **prov) -> Path:
    n = len(emb)
    rng = np.random.default_rng(1)
    X = sp.random(n, 30, density=0.2, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.ceil(X.data * 5)
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(30)]))
    a.obsm["X_uce"] = emb.astype(np.float32)
    a.uns["uce"] = {"version": "0.1.0", "species": "human", "model_file": "4layer_model.torch",
                    "model_sha256": "0123456789abcdef" * 4, "nlayers": 4, "compat": "none", "seed": 0,
                    "batch_size": 25, "precision": "float32", "device": "cpu", "n_shards": 2,
                    "embed_seconds": 12.5, "preprocess": stats, **prov}
    a.write_h5ad(path)
    return path


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("report_in")
    rng = np.random.default_rng(0)
    # healthy: 5 well separated clusters
    n = 600
    lab = rng.integers(0, 5, n)
    centers = rng.normal(size=(5, DIM))
    healthy = unit(centers[lab] + 0.35 * rng.normal(size=(n, DIM)))
    obs = pd.DataFrame({"louvain": pd.Categorical([str(i) for i in lab]),
                        "cell_type_ontology_term_id": pd.Categorical([f"CL:{i:07d}" for i in lab]),
                        "n_genes": rng.integers(25, 500, n),
                        "cell_type": pd.Categorical(np.array(["B cell", "T cell", "NK cell", "monocyte", "DC"])[lab])},
                       index=[f"h{i}" for i in range(n)])
    h = write_output(d / "healthy_uce_adata.h5ad", healthy, obs, preprocess_stats(640, 600, 33, 7))
    # collapsed: every cell nearly the same vector
    m = 300
    base = rng.normal(size=DIM)
    collapsed = unit(base + 0.01 * rng.normal(size=(m, DIM)))
    obs2 = pd.DataFrame({"bulk_labels": pd.Categorical(rng.choice(["CD14+ Monocyte", "CD4+/CD45RA+ Naive T"], m))},
                        index=[f"c{i}" for i in range(m)])
    c = write_output(d / "collapsed_uce_adata.h5ad", collapsed, obs2, preprocess_stats(310, 300, 10, 0, genes_kept=777),
                     compat="reference", seed=7, n_shards=1)
    trace = d / "execution_trace.txt"
    cols = ["task_id", "hash", "native_id", "process", "tag", "name", "status", "exit", "realtime", "peak_rss"]
    rows = [
        ["1", "ab/cd", "1", "UCE_NF:UCE:PREPARE_SPECIES", "human", "UCE_NF:UCE:PREPARE_SPECIES (human)", "COMPLETED", "0", "4.2s", "1.5 GB"],
        ["2", "ab/ce", "2", "UCE_NF:UCE:PREPROCESS", "healthy", "UCE_NF:UCE:PREPROCESS (healthy)", "COMPLETED", "0", "1m 3s", "800 MB"],
        ["3", "ab/cf", "3", "UCE_NF:UCE:EMBED", "healthy.shard-00000", "UCE_NF:UCE:EMBED (healthy.shard-00000)", "COMPLETED", "0", "10s", "2 GB"],
        ["4", "ab/d0", "4", "UCE_NF:UCE:EMBED", "healthy.shard-00001", "UCE_NF:UCE:EMBED (healthy.shard-00001)", "CACHED", "0", "2.5s", "1 GB"],
        ["5", "ab/d1", "5", "UCE_NF:UCE:EMBED", "collapsed.shard-00000", "UCE_NF:UCE:EMBED (collapsed.shard-00000)", "FAILED", "1", "1h", "1 GB"],
        ["6", "ab/d2", "6", "UCE_NF:UCE:EMBED", "collapsed.shard-00000", "UCE_NF:UCE:EMBED (collapsed.shard-00000)", "COMPLETED", "0", "500ms", "-"],
    ]
    trace.write_text("\n".join("\t".join(r) for r in [cols] + rows) + "\n")
    return {"healthy": h, "collapsed": c, "trace": trace}


@pytest.fixture(scope="module")
def report(outputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_out") / "report"
    res = CliRunner().invoke(main, ["report", "--adata", str(outputs["healthy"]), "--adata", str(outputs["collapsed"]),
                                    "--output-dir", str(out), "--trace", str(outputs["trace"])],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


def text_of(html: str, row_id: str) -> str:
    m = re.search(rf'<tr id="{re.escape(row_id)}">(.*?)</tr>', html, re.DOTALL)
    assert m, row_id
    return " ".join(re.sub(r"<[^>]+>", " ", m.group(1)).split())


def test_html_self_contained(report):
    html = (report / "uce_report.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', html, re.IGNORECASE)
    assert "<script" not in html.lower() and "@import" not in html and "url(" not in html
    assert "uce-nf 0.1.0" in html and "run date" in html
    assert not list(report.glob(".*tmp*")), "temporary files left behind"


def test_html_rows(report):
    html = (report / "uce_report.html").read_text()
    assert text_of(html, "cells-healthy").split()[:9] == ["healthy", "human", "640", "600", "93.8%", "33", "7",
                                                           "1,200", "900"]
    assert "850" in text_of(html, "cells-healthy") and "min_cells 10, min_genes 25" in text_of(html, "cells-healthy")
    assert text_of(html, "cells-collapsed").split()[2:7] == ["310", "300", "96.8%", "10", "0"]
    assert "777" in text_of(html, "cells-collapsed")
    run = text_of(html, "run-healthy")
    for s in ["4layer_model.torch", "4 layers", "sha256 0123456789ab", "none", "float32", "cpu", "1.2 s", "12.5 s",
              "PREPROCESS 1 m 03 s", "EMBED 12.5 s (2 tasks)"]:
        assert s in run, (s, run)
    run_c = text_of(html, "run-collapsed")
    assert "reference" in run_c and " 7 " in f" {run_c} " and "EMBED 0.50 s" in run_c and "(2 tasks)" not in run_c
    assert "PREPARE_SPECIES" in html  # the whole-run trace table


def test_images_and_collapse_warning(report):
    html = (report / "uce_report.html").read_text()
    imgs = re.findall(r'<img alt="([^"]+) embedding map" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert [n for n, _ in imgs] == ["healthy", "collapsed"]
    import base64
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for _, b in imgs)
    assert "possible collapse" in text_of(html, "qc-collapsed")
    assert "possible collapse" not in text_of(html, "qc-healthy") and " ok" in text_of(html, "qc-healthy")
    cards = {m.group(1): m.group(2) for m in re.finditer(r'<div class="card[ a-z]*" id="map-(\w+)">(.*?)<img', html, re.DOTALL)}
    assert "possible collapse" in cards["collapsed"] and "possible collapse" not in cards["healthy"]
    assert "coloured by cell_type (auto)" in cards["healthy"]
    assert "coloured by bulk_labels (auto)" in cards["collapsed"]


def test_summary_and_multiqc(report):
    summ = json.loads((report / "uce_summary.json").read_text())
    h, c = summ["samples"]["healthy"], summ["samples"]["collapsed"]
    assert h["cells"] == 600 and h["dim"] == DIM and h["preprocess"]["cells_in"] == 640
    assert abs(h["qc"]["norm_min"] - 1) < 1e-5 and abs(h["qc"]["norm_max"] - 1) < 1e-5
    assert h["qc"]["mean_cosine"] < 0.5 and not h["qc"]["collapsed"]
    assert c["qc"]["mean_cosine"] > 0.99 and c["qc"]["collapsed"]
    assert h["map"]["color_by"] == ["cell_type"] and h["map"]["method"] == "pca"
    assert h["trace"]["EMBED"] == {"tasks": 2, "realtime_s": 12.5, "peak_rss_bytes": 2 * 1024 ** 3}
    assert summ["trace"]["EMBED"]["tasks"] == 3  # the FAILED attempt is not counted
    assert summ["collapse_threshold"] == 0.95

    mqc = json.loads((report / "uce_mqc.json").read_text())
    assert {"id", "section_name", "plot_type", "pconfig", "headers", "data"} <= set(mqc)
    assert mqc["plot_type"] == "table" and "id" in mqc["pconfig"]
    assert set(mqc["data"]) == {"healthy", "collapsed"}
    row = mqc["data"]["healthy"]
    assert row["cells_in"] == 640 and row["cells_kept"] == 600 and row["genes_kept"] == 850
    assert 0 <= row["mean_cosine"] < 0.5 and mqc["data"]["collapsed"]["mean_cosine"] > 0.99
    assert set(row) <= set(mqc["headers"])
    # straight from h5ads there is no species file: its numbers are "not recorded" (test_report_species.py)
    assert [r["species"] for r in summ["species"]] == ["human"] and not summ["species"][0]["recorded"]
    assert [d["name"] for d in summ["species"][0]["datasets"]] == ["healthy", "collapsed"]
    assert json.loads((report / "uce_species_mqc.json").read_text())["data"]["human"]["origin"] == "not recorded"


def test_color_by_options(outputs, tmp_path):
    out = tmp_path / "r"
    res = CliRunner().invoke(main, ["report", "--adata", str(outputs["healthy"]), "--output-dir", str(out),
                                    "--color-by", "louvain", "--color-by", "n_genes", "--color-by", "nope",
                                    "--collapse-threshold", "0.2", "--max-map-cells", "100"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    s = json.loads((out / "uce_summary.json").read_text())["samples"]["healthy"]
    assert s["map"]["color_by"] == ["louvain", "n_genes"] and s["map"]["missing_color_by"] == ["nope"]
    assert s["map"]["cells"] == 100 and s["qc"]["cosine_cells"] == 600
    assert s["qc"]["collapsed"] and 0.2 < s["qc"]["mean_cosine"] < 0.3  # a stricter threshold flags it
    html = (out / "uce_report.html").read_text()
    assert "not in obs: nope" in html and "Nextflow tasks" not in html


def test_user_errors(outputs, tmp_path):
    bad = tmp_path / "bad_uce_adata.h5ad"
    ad.AnnData(X=np.zeros((3, 2), dtype=np.float32)).write_h5ad(bad)
    res = CliRunner().invoke(main, ["report", "--adata", str(bad), "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no obsm['X_uce']" in res.output
    res = CliRunner().invoke(main, ["report", "--adata", str(outputs["healthy"]), "--adata", str(outputs["healthy"]),
                                    "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 2 and "more than once" in res.output


def test_helpers():
    kinds = {"louvain": "categorical", "cell_type_ontology_term_id": "categorical", "n_genes": "numeric",
             "cell_type": "categorical", "CellType_fine": "string"}
    assert default_color_column(kinds) == "cell_type"
    assert default_color_column({"Leiden_res1": "categorical", "cluster": "string"}) == "Leiden_res1"
    assert default_color_column({"n_genes": "numeric", "batch": "categorical"}) is None
    assert parse_duration("1h 2m 3s") == 3723 and parse_duration("120ms") == 0.12 and parse_duration("-") is None
    assert parse_duration("4500") == 4.5 and parse_memory("1.5 GB") == 1.5 * 1024 ** 3 and parse_memory("-") is None
    rng = np.random.default_rng(0)
    x = unit(rng.normal(size=(500, 32)))
    assert abs(mean_pairwise_cosine(x)) < 0.02
    full = x @ x.T
    assert np.isclose(mean_pairwise_cosine(x), (full.sum() - np.trace(full)) / (500 * 499))
    assert mean_pairwise_cosine(x[:1]) is None


def test_minimal_inputs(tmp_path):
    """One cell, no provenance, no obs columns: still a report, with the gaps said out loud."""
    one = tmp_path / "one_uce_adata.h5ad"
    a = ad.AnnData(X=np.zeros((1, 3), dtype=np.float32))
    a.obsm["X_uce"] = unit(np.ones((1, 8))).astype(np.float32)
    a.write_h5ad(one)
    nan = tmp_path / "nan_uce_adata.h5ad"
    b = ad.AnnData(X=np.zeros((50, 3), dtype=np.float32))
    e = unit(np.random.default_rng(0).normal(size=(50, 8)))
    e[3] = np.nan
    e[4] *= 2
    b.obsm["X_uce"] = e.astype(np.float32)
    b.write_h5ad(nan)
    out = tmp_path / "r"
    res = CliRunner().invoke(main, ["report", "--adata", str(one), "--adata", str(nan), "--output-dir", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    s = json.loads((out / "uce_summary.json").read_text())["samples"]
    assert s["one"]["qc"]["mean_cosine"] is None and s["one"]["map"]["color_by"] == []
    assert s["nan"]["qc"]["non_finite_cells"] == 1 and s["nan"]["qc"]["off_unit_cells"] == 1
    assert not s["nan"]["qc"]["unit_norm"] and abs(s["nan"]["qc"]["norm_max"] - 2) < 1e-5
    html = (out / "uce_report.html").read_text()
    assert "no uns[&#x27;uce&#x27;] provenance" in html and "not unit norm" in text_of(html, "qc-nan")
    assert html.count("data:image/png;base64,") == 2


# ---------------------------------------------------------------------------------------------
# The pipeline's route: MERGE's small per-sample summaries instead of the final h5ads (issue 12)
# ---------------------------------------------------------------------------------------------
def without_generated(text: str) -> str:
    """The report minus its own timestamp (the only thing two builds may differ in)."""
    text = re.sub(r"report generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", "", text)
    return re.sub(r'"generated": "[^"]+"', "", text)


@pytest.mark.parametrize("color_by", [(), ("louvain", "n_genes", "is_b", "nope")])
def test_summaries_give_the_same_report(outputs, tmp_path, color_by):
    """`uce merge --summary` files -> the same page, numbers, maps and MultiQC table as the h5ads,
    without the h5ads: they are moved away before the report is built from the summaries."""
    from uce_nf.report import build_report
    from uce_nf.report_summary import write_summary
    src = tmp_path / "src"
    src.mkdir()
    ins, sums = [], []
    for name in ("healthy", "collapsed"):
        p = src / outputs[name].name
        a = ad.read_h5ad(outputs[name])
        if name == "healthy":  # a bool column too, with the categorical, numeric and string ones
            a.obs["is_b"] = (a.obs["cell_type"] == "B cell").to_numpy()
        a.write_h5ad(p)
        ins.append(p)
        sums.append(write_summary(p, tmp_path / "sum" / f"{name}.summary.json"))
    direct = build_report(ins, tmp_path / "direct", color_by=color_by)
    moved = tmp_path / "moved"
    src.rename(moved)
    via = build_report([], tmp_path / "via", summaries=sums, color_by=color_by)
    assert without_generated(json.dumps(via)) == without_generated(json.dumps(direct))
    for f in ("uce_report.html", "uce_mqc.json", "uce_species_mqc.json", "uce_summary.json"):
        assert without_generated((tmp_path / "via" / f).read_text()) == \
            without_generated((tmp_path / "direct" / f).read_text()), f
    if color_by:
        assert via["samples"]["healthy"]["map"]["color_by"] == ["louvain", "n_genes", "is_b"]
    # small: the map's PCs (<= 50 per cell) and obs values, not the 64-dim embeddings and counts
    npz = tmp_path / "sum" / "healthy.summary.npz"
    with np.load(npz) as z:
        assert z["pcs"].shape == (600, 50) and z["pcs"].dtype == np.float32
    assert npz.stat().st_size < (moved / "healthy_uce_adata.h5ad").stat().st_size


def test_summary_errors(outputs, tmp_path):
    from uce_nf.report_summary import write_summary
    bad = tmp_path / "x.summary.json"
    bad.write_text('{"format": "something else"}')
    res = CliRunner().invoke(main, ["report", "--summary", str(bad), "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a report summary" in res.output and "re-run its MERGE task" in res.output
    ok = write_summary(outputs["healthy"], tmp_path / "h.summary.json")
    (tmp_path / "h.summary.npz").unlink()
    res = CliRunner().invoke(main, ["report", "--summary", str(ok), "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 2 and "h.summary.npz is missing" in res.output
    res = CliRunner().invoke(main, ["report", "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 2 and "nothing to report" in res.output


# ---------------------------------------------------------------------------------------------
# The atlas section (--atlas-dir: the output folder of `uce atlas`)
# ---------------------------------------------------------------------------------------------
def png(color: str) -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 2), dpi=50)
    ax.scatter([0, 1, 2], [1, 0, 2], c=color)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_atlas_dir(d: Path, *, label_transfer: bool = True) -> Path:
    """An output folder in the shape `uce atlas` writes (atlas_summary.json + PNGs)."""
    d.mkdir(parents=True)
    summ = {"n_cells": 900, "samples": {"healthy": {"species": "human", "n_cells": 600},
                                        "collapsed": {"species": "mouse", "n_cells": 300}},
            "metrics": {"label_silhouette": 0.61234, "batch_asw": 0.8766, "ilisi": 1.42, "knn_label_consistency": 0.9},
            "metrics_seconds": 3.25, "umap": {"cells_fitted": 900, "projected": 0}, "timings": {"umap": 4.0}}
    if label_transfer:
        summ["label_transfer"] = {
            "reference_samples": ["healthy"], "k": 15, "label_column": "bulk_labels", "holdout_accuracy": 0.9526,
            "n_holdout": 120, "queries": {"collapsed": {"n": 300, "accuracy": 0.8133, "mean_confidence": 0.71,
                                                        "truth_column": "cell_type",
                                      "confusion": {"labels": ["B cell", "T cell"], "matrix": [[120, 30], [26, 124]]}}}}
    (d / "atlas_summary.json").write_text(json.dumps(summ))
    for i, kind in enumerate(("sample", "species", "label", "leiden")):
        (d / f"atlas_umap_{kind}_mqc.png").write_bytes(png(f"C{i}"))
    if label_transfer:
        (d / "atlas_confusion_mqc.png").write_bytes(png("C5"))
    return d


def test_atlas_section(outputs, tmp_path):
    atlas = write_atlas_dir(tmp_path / "atlas")
    out = tmp_path / "r"
    res = CliRunner().invoke(main, ["report", "--adata", str(outputs["healthy"]), "--adata", str(outputs["collapsed"]),
                                    "--atlas-dir", str(atlas), "--output-dir", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    html = (out / "uce_report.html").read_text()
    assert '<h2 id="atlas">Atlas</h2>' in html
    assert text_of(html, "atlas-sample-collapsed").split() == ["collapsed", "mouse", "300"]
    maps = re.findall(r'<img alt="atlas UMAP (by [a-zA-Z ]+)" src="data:image/png;base64,', html)
    assert maps == ["by sample", "by species", "by label", "by Leiden cluster"]
    assert text_of(html, "atlas-metric-label_silhouette").split() == ["label_silhouette", "0.612"]
    assert text_of(html, "atlas-metric-batch_asw").split() == ["batch_asw", "0.877"]
    assert "computed in 3.2 s" in html
    assert text_of(html, "atlas-holdout").split()[-4:] == ["bulk_labels", "120", "95.3%", "–"]
    assert text_of(html, "atlas-query-collapsed").split() == ["collapsed", "cell_type", "300", "81.3%", "0.710"]
    conf = re.search(r'<table class="confusion" id="atlas-confusion-collapsed">(.*?)</table>', html, re.DOTALL).group(1)
    assert [" ".join(re.sub(r"<[^>]+>", " ", r).split()) for r in re.findall(r"<tr>(.*?)</tr>", conf)][1:] == \
        ["B cell 120 30", "T cell 26 124"]
    assert 'alt="label transfer confusion matrix"' in html
    # still self-contained, and the summary carries the atlas numbers
    assert "<script" not in html.lower() and not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', html)
    assert json.loads((out / "uce_summary.json").read_text())["atlas"]["label_transfer"]["holdout_accuracy"] == 0.9526


def test_atlas_section_without_label_transfer(outputs, tmp_path):
    from uce_nf.report import build_report
    atlas = write_atlas_dir(tmp_path / "atlas", label_transfer=False)
    (atlas / "atlas_umap_label_mqc.png").write_bytes(b"")  # a stub run's empty file: not shown
    build_report([outputs["healthy"]], tmp_path / "r", atlas_dir=atlas)
    html = (tmp_path / "r" / "uce_report.html").read_text()
    assert "No label transfer: pass <code>--reference_samples</code>" in html
    assert len(re.findall(r'<img alt="atlas UMAP', html)) == 3
    res = CliRunner().invoke(main, ["report", "--adata", str(outputs["healthy"]), "--atlas-dir", str(tmp_path),
                                    "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 2 and "atlas_summary.json: not a readable atlas summary" in res.output


def test_few_matched_genes_warn(tmp_path):
    """< 30% of a dataset's genes in its species' vocabulary: a warning in the report (issue 13)."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, DIM))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(40)])
    few = write_output(tmp_path / "few_uce_adata.h5ad", emb, obs, preprocess_stats(40, 40, 0, 0, genes_with_embedding=300))
    ok = write_output(tmp_path / "ok_uce_adata.h5ad", emb, obs, preprocess_stats(40, 40, 0, 0, genes_with_embedding=400))
    res = CliRunner().invoke(main, ["report", "--adata", str(few), "--adata", str(ok), "--output-dir", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    summ = json.loads((tmp_path / "r" / "uce_summary.json").read_text())["samples"]
    assert any("only 300 of 1200 genes (25%) match the vocabulary of species 'human'" in w for w in summ["few"]["warnings"])
    assert not any("match the vocabulary" in w for w in summ["ok"]["warnings"])
    assert "only 300 of 1200 genes" in (tmp_path / "r" / "uce_report.html").read_text()
