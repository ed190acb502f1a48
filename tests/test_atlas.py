"""`uce atlas` (issue 14): integration metrics on known configurations, label transfer on a split of
the annotated demo PBMC, reproducibility, samplesheet order, embeddings-mode NaN rows, the
subsample + projection path, and one-line errors. Real h5ad files, the real command (in-process,
so numba compiles UMAP once for the whole file)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import PBMC, ROOT

sys.path.insert(0, str(ROOT / "bench"))


def atlas(*args) -> tuple[int, str]:
    from uce_nf.cli import main
    r = CliRunner().invoke(main, ["atlas", *map(str, args)], catch_exceptions=False)
    return r.exit_code, r.output


def inputs_args(paths, samples, species=None):
    out = []
    for i, (p, s) in enumerate(zip(paths, samples)):
        out += ["--adata", p, "--sample", s, "--species", (species or ["human"] * len(paths))[i]]
    return out


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------------------- metrics

def blobs(rng, n_types, per, dim=16, noise=0.05):
    centres = unit(rng.standard_normal((n_types, dim)))
    t = np.repeat(np.arange(n_types), per)
    return unit(centres[t] + noise * rng.standard_normal((len(t), dim))), t


def test_metrics_separated_labels_and_mixed_batches():
    from uce_nf.atlas_metrics import integration_metrics
    rng = np.random.default_rng(0)
    x, t = blobs(rng, 4, 150)
    batch = rng.integers(0, 3, len(x))  # three batches spread evenly inside every label: fully mixed
    m = integration_metrics(x, batch, np.array([f"t{v}" for v in t], dtype=object), k=15)
    assert m["metrics"]["label_asw"] > 0.95
    assert m["metrics"]["knn_label_consistency"] == 1.0
    assert m["metrics"]["batch_asw"] > 0.95
    assert m["metrics"]["ilisi"] > 2.6  # 3 batches in equal shares: close to 3
    assert m["metrics"]["ilisi_scaled"] > 0.8
    assert m["skipped"] == {} and m["seconds"] >= 0
    # the same cells with random labels: the label metrics must drop (they can fail)
    shuffled = rng.permutation(t)
    r = integration_metrics(x, batch, np.array([f"t{v}" for v in shuffled], dtype=object), k=15)["metrics"]
    assert r["label_asw"] < 0.55 and r["knn_label_consistency"] < 0.4


def test_metrics_separated_batches_score_low():
    from uce_nf.atlas_metrics import integration_metrics
    rng = np.random.default_rng(1)
    dim = 16
    types, batches = unit(rng.standard_normal((3, dim))), unit(rng.standard_normal((2, dim)))
    t = np.repeat(np.arange(3), 200)
    b = np.tile(np.repeat(np.arange(2), 100), 3)
    x = unit(types[t] + 0.8 * batches[b] + 0.03 * rng.standard_normal((len(t), dim)))
    m = integration_metrics(x, b, np.array([f"t{v}" for v in t], dtype=object), k=15)["metrics"]
    assert m["batch_asw"] < 0.3  # each label split into two batch islands
    assert m["ilisi"] < 1.1 and m["ilisi_scaled"] < 0.1


def test_metrics_skipped_without_batches_or_labels():
    from uce_nf.atlas_metrics import integration_metrics
    x, t = blobs(np.random.default_rng(2), 3, 40)
    one = integration_metrics(x, None, np.array([str(v) for v in t], dtype=object), k=10)
    assert set(one["skipped"]) == {"batch_asw", "ilisi", "ilisi_scaled"} and "label_asw" in one["metrics"]
    none = integration_metrics(x, np.arange(len(x)) % 2, None, k=10)
    assert {"label_asw", "knn_label_consistency", "batch_asw"} <= set(none["skipped"]) and "ilisi" in none["metrics"]


# --------------------------------------------------------------------------------------- label transfer

@pytest.fixture(scope="module")
def pbmc_split(tmp_path_factory) -> tuple[Path, Path]:
    """The demo PBMC (700 annotated cells) as two MERGE-shaped files, a seeded half each. X_uce is its
    expression-derived representation (top 30 PCs of log-normalised counts, unit rows): the demo UCE
    checkpoint has synthetic weights, so its embeddings carry little cell-type signal (docs/usage.md)."""
    import scanpy as sc
    d = tmp_path_factory.mktemp("pbmc_split")
    a = ad.read_h5ad(PBMC)
    b = a.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    sc.pp.scale(b, max_value=10)
    from uce_nf.atlas_knn import _pca
    x = np.asarray(b.X, dtype=np.float32)
    mean, comps, _ = _pca(x, 30)
    a.obsm["X_uce"] = unit((x - mean) @ comps)
    a.obs["uce_input_row"] = np.arange(a.n_obs, dtype=np.int64)
    a.obs["uce_input_name"] = a.obs_names.astype(str)
    half = np.zeros(a.n_obs, dtype=bool)
    half[np.random.default_rng(0).permutation(a.n_obs)[: a.n_obs // 2]] = True
    a[half].copy().write_h5ad(d / "ref_uce_adata.h5ad")
    a[~half].copy().write_h5ad(d / "query_uce_adata.h5ad")
    return d / "ref_uce_adata.h5ad", d / "query_uce_adata.h5ad"


def test_label_transfer_pbmc_split(pbmc_split, tmp_path):
    ref, query = pbmc_split
    rc, out = atlas(*inputs_args([ref, query], ["ref", "query"]), "--reference-sample", "ref",
                    "--label-column", "bulk_labels", "--output-dir", tmp_path)
    assert rc == 0, out
    s = json.loads((tmp_path / "atlas_summary.json").read_text())
    lt = s["label_transfer"]
    q = lt["queries"]["query"]
    a = ad.read_h5ad(tmp_path / "uce_atlas.h5ad")
    qm = (a.obs["sample"] == "query").to_numpy()
    truth = a.obs["bulk_labels"].astype(str).to_numpy()[qm]
    pred = a.obs["uce_label_transfer"].astype(str).to_numpy()[qm]
    assert q["n_with_truth"] == qm.sum() == 350
    assert q["accuracy"] == pytest.approx(np.mean(truth == pred), abs=1e-12)  # the summary is what the file says
    # an independent classifier on the same cells: scikit-learn's brute-force cosine kNN
    from sklearn.neighbors import KNeighborsClassifier
    rm = ~qm
    knc = KNeighborsClassifier(n_neighbors=15, metric="cosine", algorithm="brute")
    knc.fit(a.obsm["X_uce"][rm], a.obs["bulk_labels"].astype(str).to_numpy()[rm])
    assert np.mean(knc.predict(a.obsm["X_uce"][qm]) == pred) > 0.95  # only vote ties may differ
    chance = float((pd.Series(truth).value_counts(normalize=True) ** 2).sum())
    majority = float(pd.Series(truth).value_counts(normalize=True).iloc[0])
    print(f"PBMC split label transfer: accuracy {q['accuracy']:.4f}, holdout {lt['holdout_accuracy']:.4f}, "
          f"chance {chance:.3f}, majority {majority:.3f}")
    assert q["accuracy"] > max(2 * majority, 3 * chance)
    assert lt["holdout_accuracy"] > max(2 * majority, 3 * chance) and lt["n_holdout"] == 70
    conf = a.obs["uce_label_transfer_confidence"].to_numpy()
    assert np.all((conf[qm] >= 1 / 15 - 1e-6) & (conf[qm] <= 1)) and np.isnan(conf[~qm]).all()
    assert a.obs["uce_label_transfer"][~qm].isna().all()  # reference cells keep only their own labels
    m = np.array(q["confusion"]["matrix"])
    assert m.sum() == 350 and np.trace(m) == round(q["accuracy"] * 350)
    assert (tmp_path / "atlas_confusion_mqc.png").stat().st_size > 10_000
    # single sample: batch metrics skipped, label metrics computed
    tsv = (tmp_path / "atlas_metrics_mqc.tsv").read_text()
    assert "# plot_type: 'table'" in tsv and "accuracy_query" in tsv


# --------------------------------------------------------------------------------------- atlas assembly

@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> list[Path]:
    """Three MERGE-like samples of 32-dim clustered unit vectors; s1 in embeddings mode (every 10th
    row NaN with obs['uce_embedded'] False)."""
    from atlas_bench import make_sample
    d = tmp_path_factory.mktemp("atlas_synth")
    rng = np.random.default_rng(5)
    centres = unit(rng.standard_normal((5, 32)))
    paths = []
    for i, n in enumerate([400, 300, 250]):
        p = d / f"s{i}_uce_adata.h5ad"
        make_sample(p, n, 32, centres, 0.05 * rng.standard_normal(32).astype(np.float32), 10 + i,
                    embeddings_mode=(i == 1))
        paths.append(p)
    return paths


def test_atlas_order_nan_rows_projection_and_reproducibility(synth, tmp_path):
    order = [2, 0, 1]  # not sorted: the atlas keeps the samplesheet order
    args = [*inputs_args([synth[i] for i in order], [f"s{i}" for i in order], ["mouse", "human", "human"]),
            "--umap-max-cells", 200, "--metrics-max-cells", 300, "--n-pcs", 8]
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        rc, out = atlas(*args, "--seed", seed, "--output-dir", tmp_path / name)
        assert rc == 0, out
    a, b, c = (ad.read_h5ad(tmp_path / n / "uce_atlas.h5ad") for n in "abc")
    n_embedded = 250 + 400 + 270
    assert a.n_obs == n_embedded and a.n_vars == 0
    assert list(a.obs["sample"].cat.categories) == ["s2", "s0", "s1"]
    assert list(pd.unique(a.obs["sample"])) == ["s2", "s0", "s1"]
    assert a.obs.loc[a.obs["sample"] == "s2", "species"].eq("mouse").all()
    assert a.obs_names.is_unique and a.obs_names[0] == "s2:cell0"
    # every embedded row, copied exactly; the NaN rows of s1 skipped
    with h5py.File(synth[1]) as f:
        src = f["obsm"]["X_uce"][:]
    s1 = (a.obs["sample"] == "s1").to_numpy()
    rows = a.obs["uce_input_row"].to_numpy()[s1]
    assert len(rows) == 270 and not np.any(rows % 10 == 9)
    np.testing.assert_array_equal(a.obsm["X_uce"][s1], src[rows])
    assert np.isfinite(a.obsm["X_uce"]).all() and a.obs["uce_embedded"].all()
    # fit on 200 cells, the rest projected
    s = json.loads((tmp_path / "a" / "atlas_summary.json").read_text())
    assert s["umap"]["cells_fit"] == 200 and s["umap"]["cells_projected"] == n_embedded - 200
    assert s["metrics_cells"] == 300 and s["neighbour_space"]["n_pcs"] == 8
    assert a.obsm["X_umap"].shape == (n_embedded, 2) and np.isfinite(a.obsm["X_umap"]).all()
    assert a.obs["leiden"].notna().all()
    # projected cells land with their own cell type: every leiden cluster is (nearly) one type
    ct = pd.crosstab(a.obs["cell_type"], a.obs["leiden"])
    assert (ct.max(axis=0) / ct.sum(axis=0)).min() > 0.9
    # same seed: identical content (and file); another seed: another map
    np.testing.assert_array_equal(a.obsm["X_umap"], b.obsm["X_umap"])
    assert a.obs.equals(b.obs)
    assert (tmp_path / "a" / "uce_atlas.h5ad").read_bytes() == (tmp_path / "b" / "uce_atlas.h5ad").read_bytes()
    assert not np.array_equal(a.obsm["X_umap"], c.obsm["X_umap"])
    # auto-detected obs columns and the pictures
    assert s["obs_columns"] == ["cell_type"] and s["label_column"] == "cell_type"
    assert {"batch_asw", "ilisi", "label_asw", "knn_label_consistency"} <= set(s["metrics"])
    for p in ("sample", "species", "label", "leiden"):
        assert (tmp_path / "a" / f"atlas_umap_{p}_mqc.png").stat().st_size > 5_000
    assert "label_transfer" not in s and not (tmp_path / "a" / "atlas_confusion_mqc.png").exists()


# --------------------------------------------------------------------------------------- errors

def test_one_line_errors(synth, pbmc_split, tmp_path):
    empty = tmp_path / "empty_uce.h5ad"
    a = ad.read_h5ad(synth[1])
    a.obs["uce_embedded"] = False
    a.write_h5ad(empty)
    nolabel = tmp_path / "nolabel_uce.h5ad"
    a = ad.read_h5ad(synth[1])
    a.obs = a.obs.rename(columns={"cell_type": "other"})
    a.write_h5ad(nolabel)
    s0, s1 = synth[0], synth[1]
    ref, query = pbmc_split
    cases = [
        (["--adata", s0, "--adata", s1, "--sample", "a", "--species", "human", "--species", "human"],
         "--adata given 2 times, --sample 1"),
        ([*inputs_args([s0, s1], ["a", "a"])], "--sample a given more than once"),
        ([*inputs_args([s0, s1], ["a", "b"]), "--reference-sample", "c"], "--reference-sample c: not a --sample"),
        ([*inputs_args([s0, nolabel], ["a", "b"]), "--reference-sample", "b", "--label-column", "cell_type"],
         "not in the obs of reference sample b"),
        ([*inputs_args([s0, empty], ["a", "b"])], "no embedded cells"),
        ([*inputs_args([s0, PBMC], ["a", "b"])], "no obsm['X_uce']"),
        ([*inputs_args([s0, ref], ["a", "b"])], "X_uce widths differ"),
        ([*inputs_args([s0], ["a"]), "--obs-column", "leiden"], "--obs-column leiden"),
        ([*inputs_args([s0], ["a"]), "--obs-column", "nope"], "--obs-column nope: in no dataset"),
        ([*inputs_args([s0, s1], ["a", "b"]), "--reference-sample", "a", "--query-label-column", "nope"],
         "--query-label-column nope: in no query"),
    ]
    for args, msg in cases:
        rc, out = atlas(*args, "--output-dir", tmp_path / "out")
        assert rc == 2, (args, out)
        lines = out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ERROR: ") and msg in lines[0], (msg, out)
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked
