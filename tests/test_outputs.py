"""MERGE's outputs (issue 12, items 1-2): the streaming writer, --output-mode full | embeddings, the
Parquet file, and mapping results back to the input by obs['uce_input_row'], also when the input's
obs names repeat. Real h5ad/npz/parquet files through the real commands."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import PBMC, ROOT, make_edge_dataset, run_uce

N_SHARDS = 4


def read(path: Path) -> ad.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate obs names are the point of these inputs
        return ad.read_h5ad(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_dir):
    """An input whose obs names repeat (kept cells share names with each other and with cells the
    filters drop), its processed files and N_SHARDS real embedding shards."""
    d = tmp_path_factory.mktemp("outputs")
    a = read(make_edge_dataset(d / "edge.h5ad", n_cells=120, zero_cell=True))
    a = a[np.random.default_rng(0).permutation(a.n_obs)].copy()  # dropped cells between kept ones
    names = np.array(a.obs_names, dtype=object)
    dropped = np.flatnonzero([n.startswith(("few", "zero_")) for n in names])
    kept = np.setdiff1d(np.arange(len(names)), dropped)
    names[kept[1]] = names[kept[0]]              # two kept cells, one name
    names[dropped[0]] = names[kept[2]]           # a dropped cell named like a kept cell
    names[dropped[1]] = names[kept[0]]           # and one like both of the first two
    a.obs_names = names
    a.obs["batch"] = pd.Categorical(np.where(np.arange(a.n_obs) % 2, "b1", "b2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_h5ad(d / "in.h5ad")
    run_uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--output", d / "h.pt")
    run_uce("preprocess", "--input", d / "in.h5ad", "--species-file", d / "h.pt", "--output", d / "p.h5ad",
            "--stats", d / "s.json")
    run_uce("index", "--adata", d / "p.h5ad", "--species-file", d / "h.pt", "--output", d / "i.npz")
    st = json.loads((d / "s.json").read_text())
    run_uce("sentences", "--adata", d / "p.h5ad", "--index", d / "i.npz", "--output-dir", d, "--name", "x",
            "--shard-size", -(-st["cells_kept"] // N_SHARDS), "--workers", 1)
    shards = []
    for s in sorted(d.glob("x.shard-*.sentences.npz")):
        out = s.with_name(s.name.replace("sentences", "embeddings"))
        run_uce("embed", "--sentences", s, "--species-file", d / "h.pt", "--model-dir", model_dir, "--output", out)
        shards.append(out)
    assert len(shards) == N_SHARDS
    return {"dir": d, "input": d / "in.h5ad", "shards": shards, "stats": st}


def merge(run, out: Path, *extra, shards=None) -> Path:
    d = run["dir"]
    emb = sum((["--embeddings", e] for e in (shards or run["shards"])), [])
    run_uce("merge", "--adata", d / "p.h5ad", *emb, "--stats", d / "s.json", "--species-file", d / "h.pt",
            "--output", out, *extra)
    return out


def shard_rows(shards) -> np.ndarray:
    """Every shard's rows, by processed cell."""
    parts = [dict(np.load(s)) for s in shards]
    n = sum(len(p["cell_index"]) for p in parts)
    x = np.full((n, parts[0]["embeddings"].shape[1]), np.nan, np.float32)
    for p in parts:
        x[p["cell_index"]] = p["embeddings"]
    return x


@pytest.fixture(scope="module")
def full(run):
    return merge(run, run["dir"] / "x_uce_adata.h5ad")


@pytest.fixture(scope="module")
def emb(run):
    return merge(run, run["dir"] / "x_uce.h5ad", "--output-mode", "embeddings", "--input", run["input"])


def test_input_has_what_the_tests_need(run):
    st = run["stats"]
    assert st["duplicate_obs_names"] >= 1 and st["cells_dropped_min_genes"] == 5 and st["cells_dropped_zero_counts"] == 1
    assert st["cells_kept"] < st["cells_in"]


def test_full_mode_maps_back_by_input_row(run, full):
    a, src = read(full), read(run["input"])
    assert a.n_obs == run["stats"]["cells_kept"] and a.obs_names.is_unique
    rows = a.obs["uce_input_row"].to_numpy()
    assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0)
    assert list(a.obs["uce_input_name"]) == list(src.obs_names[rows])
    assert list(a.obs["cell_type"]) == list(src.obs["cell_type"].iloc[rows])  # the same cells, not just the same names
    np.testing.assert_array_equal(a.obsm["X_uce"], shard_rows(run["shards"]))
    assert a.X.shape[1] == a.n_vars > 0 and a.uns["uce"]["output_mode"] == "full"
    # the recipe of the report and docs/output.md, on an input with repeated names
    src.obsm["X_uce"] = np.full((src.n_obs, a.obsm["X_uce"].shape[1]), np.nan, np.float32)
    src.obsm["X_uce"][a.obs["uce_input_row"].to_numpy()] = a.obsm["X_uce"]
    assert np.isnan(src.obsm["X_uce"]).all(axis=1).sum() == src.n_obs - a.n_obs
    with pytest.raises(Exception):  # what users did before: fails on repeated names
        src[a.obs_names].copy()


def test_embeddings_mode_every_input_cell_in_order(run, full, emb):
    e, f, src = read(emb), read(full), read(run["input"])
    assert e.n_obs == src.n_obs and list(e.obs_names) == list(src.obs_names)
    assert e.X is None and e.n_vars == 0 and not e.layers  # no counts
    for col in src.obs.columns:
        pd.testing.assert_series_equal(e.obs[col], src.obs[col])
    np.testing.assert_array_equal(e.obs["uce_input_row"], np.arange(src.n_obs))
    assert e.obs["uce_input_row"].dtype == np.int64
    assert list(e.obs["uce_input_name"]) == list(src.obs_names)
    kept = f.obs["uce_input_row"].to_numpy()
    flag = e.obs["uce_embedded"].to_numpy()
    assert flag.dtype == bool and flag.sum() == f.n_obs and np.array_equal(np.flatnonzero(flag), kept)
    x = e.obsm["X_uce"]
    assert x.dtype == np.float32 and np.isnan(x[~flag]).all() and np.isfinite(x[flag]).all()
    np.testing.assert_array_equal(x[kept], f.obsm["X_uce"])
    assert np.isin(src.obs_names[~flag], src.obs_names[flag]).sum() == 2  # dropped cells named like kept ones
    assert 0 < np.flatnonzero(~flag).min() < np.flatnonzero(flag).max()  # dropped cells between kept ones
    assert e.uns["uce"]["output_mode"] == "embeddings" and e.uns["uce"]["preprocess"]["cells_kept"] == f.n_obs
    assert emb.stat().st_size < full.stat().st_size


def test_parquet_equals_the_h5ad(run, emb):
    import pyarrow as pa
    import pyarrow.parquet as pq
    e = read(emb)
    t = pq.read_table(emb.with_suffix(".parquet"))
    dim = e.obsm["X_uce"].shape[1]
    assert t.schema.names == ["obs_name", "uce_input_row", "uce_embedded", "X_uce"]
    assert t.schema.field("X_uce").type == pa.list_(pa.float32(), dim)  # fixed-size list
    assert t.column("obs_name").to_pylist() == list(e.obs_names)
    np.testing.assert_array_equal(t.column("uce_input_row").to_numpy(), np.arange(e.n_obs))
    np.testing.assert_array_equal(t.column("uce_embedded").to_numpy(), e.obs["uce_embedded"].to_numpy())
    x = t.column("X_uce").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    np.testing.assert_array_equal(x, e.obsm["X_uce"])  # NaN rows equal NaN rows
    assert json.loads(t.schema.metadata[b"uce"])["output_mode"] == "embeddings"


def same_file(a: Path, b: Path) -> None:
    x, y = read(a), read(b)
    pd.testing.assert_frame_equal(x.obs, y.obs)
    np.testing.assert_array_equal(x.obsm["X_uce"], y.obsm["X_uce"])
    assert (x.X is None) == (y.X is None) and (x.X is None or (x.X != y.X).nnz == 0)
    assert json.dumps(x.uns["uce"], default=str, sort_keys=True) == json.dumps(y.uns["uce"], default=str, sort_keys=True)


def test_shards_in_any_order_give_the_same_file(run, full, emb, tmp_path):
    """Shards passed in another order, and a shard whose rows are scrambled (its cell_index with
    them), give the same file in both modes: rows land by cell_index, never by arrival."""
    from uce_nf.io import save_npz
    first = dict(np.load(run["shards"][0]))
    perm = np.random.default_rng(1).permutation(len(first["cell_index"]))
    scrambled = tmp_path / "scrambled.embeddings.npz"
    save_npz(scrambled, **{**first, "embeddings": first["embeddings"][perm], "cell_index": first["cell_index"][perm]})
    order = [run["shards"][2], run["shards"][3], scrambled, run["shards"][1]]
    same_file(merge(run, tmp_path / "full.h5ad", shards=order), full)
    e2 = merge(run, tmp_path / "e_uce.h5ad", "--output-mode", "embeddings", "--input", run["input"], shards=order)
    same_file(e2, emb)
    same_parquet(e2.with_suffix(".parquet"), emb.with_suffix(".parquet"))


def same_parquet(a: Path, b: Path) -> None:
    import pyarrow.parquet as pq
    x, y = pq.read_table(a), pq.read_table(b)
    assert x.schema.equals(y.schema, check_metadata=True)
    for col in ("obs_name", "uce_input_row", "uce_embedded"):
        assert x.column(col).equals(y.column(col)), col
    flat = lambda t: t.column("X_uce").combine_chunks().values.to_numpy(zero_copy_only=False)  # noqa: E731
    np.testing.assert_array_equal(flat(x), flat(y))  # NaN rows equal NaN rows (Arrow's equals says no)


def test_small_blocks_match(run, full, emb, tmp_path, monkeypatch):
    """Tiny write blocks (many spans across NaN gaps, partial HDF5 chunks) change nothing."""
    import uce_nf.output as output
    dim = read(full).obsm["X_uce"].shape[1]
    monkeypatch.setattr(output, "BLOCK_BYTES", 4 * dim * 7)  # 7 rows
    monkeypatch.setattr(output, "CHUNK_BYTES", 4 * dim * 5)
    same_file(merge(run, tmp_path / "full.h5ad"), full)
    e2 = merge(run, tmp_path / "e_uce.h5ad", "--output-mode", "embeddings", "--input", run["input"])
    same_file(e2, emb)
    same_parquet(e2.with_suffix(".parquet"), emb.with_suffix(".parquet"))


def invoke(*args) -> tuple[int, str]:
    from uce_nf.cli import main
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.mark.parametrize("case", ["missing", "twice", "no_input", "wrong_input", "not_unit"])
def test_merge_errors_are_one_line(run, tmp_path, case):
    d = run["dir"]
    shards, extra = list(run["shards"]), []
    if case == "missing":
        shards = shards[1:]
    elif case == "twice":
        shards = shards + shards[:1]
    elif case == "no_input":
        extra = ["--output-mode", "embeddings"]
    elif case == "wrong_input":
        extra = ["--output-mode", "embeddings", "--input", PBMC]
    else:
        z = dict(np.load(shards[0]))
        from uce_nf.io import save_npz
        save_npz(tmp_path / "bad.embeddings.npz", **{**z, "embeddings": z["embeddings"] * 2})
        shards[0] = tmp_path / "bad.embeddings.npz"
    out = tmp_path / "o_uce.h5ad"
    code, text = invoke("merge", "--adata", d / "p.h5ad", *sum((["--embeddings", s] for s in shards), []),
                        "--stats", d / "s.json", "--species-file", d / "h.pt", "--output", out, *extra)
    lines = [l for l in text.splitlines() if l.startswith("ERROR")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in text, text
    want = {"missing": "a shard is missing", "twice": "pass each shard once", "no_input": "needs --input",
            "wrong_input": "pass the h5ad that PREPROCESS read", "not_unit": "not finite unit vectors"}[case]
    assert want in lines[0], lines[0]
    assert not list(tmp_path.glob("o_uce*")), "nothing half-written is left behind"


def test_uce_run_output_mode(run, model_dir, tmp_path):
    """`uce run --output-mode embeddings` gives the same file as the step-by-step merge."""
    out = tmp_path / "r_uce.h5ad"
    run_uce("run", "--input", run["input"], "--species", "human", "--model-dir", model_dir, "--workers", 1,
            "--output-mode", "embeddings", "--output", out)
    r = read(out)
    assert r.n_obs == read(run["input"]).n_obs and out.with_suffix(".parquet").is_file()
    assert int(r.obs["uce_embedded"].sum()) == run["stats"]["cells_kept"]


def test_bench_smoke(tmp_path):
    """bench/merge_rss.py end to end at a tiny size: it runs `uce merge` in both modes and reports
    peak RSS and wall time."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "merge_rss.py"), "--cells", "3000", "--dim", "32",
                        "--shard-size", "700", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "r.json").read_text())
    for mode in ("full", "embeddings"):
        m = res["modes"][mode]
        assert m["peak_rss_mb"] > 0 and m["seconds"] > 0 and m["checked"], m
    assert res["cells_kept"] == 3000 and res["cells_in"] > 3000


def test_report_reads_embeddings_mode(emb, full, tmp_path):
    """REPORT over an embeddings-mode file: the sample is named without _uce, the NaN rows of
    dropped cells are not flagged as broken embeddings, and the page says how to map back."""
    from uce_nf.report import build_report
    summ = build_report([emb], tmp_path / "rep", seed=0)
    s = summ["samples"]["x"]
    assert s["qc"]["non_finite_cells"] == 0 and s["qc"]["unit_norm"] and not s["warnings"], s
    html = (tmp_path / "rep" / "uce_report.html").read_text()
    assert "Mapping back to your input" in html and "uce_input_row" in html
    assert build_report([full], tmp_path / "rep_full", seed=0)["samples"]["x"]["qc"]["non_finite_cells"] == 0


@pytest.mark.nextflow
@pytest.mark.slow
def test_pipeline_embeddings_mode(tmp_path_factory):
    """The demo (-profile test; pbmc: 3 EMBED tasks) with --output_mode embeddings: every input cell in
    input order, no counts, the Parquet file, the same embeddings as a full-mode `uce run` of the
    same input, and the size against that full output (issue 12's Done criterion)."""
    from nf_utils import assert_ok, ensure_demo, read_trace, run_pipeline, simple_name
    ensure_demo()
    root = tmp_path_factory.mktemp("nf_embeddings")
    r = run_pipeline(root, "--outdir", str(root / "out"), "--output_mode", "embeddings", "--trace_report_suffix", "run")
    assert_ok(r)
    # the demo samplesheet: pbmc (3 EMBED tasks) and the mouse demo (1)
    assert sum(simple_name(x) == "EMBED" and x["tag"].startswith("pbmc_demo.") for x in read_trace(root / "out", "run")) == 3
    res = root / "out" / "pbmc_demo"
    e, src = read(res / "pbmc_demo_uce.h5ad"), read(PBMC)
    assert e.n_obs == src.n_obs and list(e.obs_names) == list(src.obs_names)
    assert e.X is None and e.n_vars == 0 and e.obs["uce_embedded"].all()  # the demo's filters keep every cell
    assert (res / "pbmc_demo_uce.parquet").is_file() and not (res / "pbmc_demo_uce_adata.h5ad").exists()
    assert json.loads((root / "out" / "report" / "uce_summary.json").read_text())["samples"]["pbmc_demo"]["cells"] == src.n_obs

    full = root / "full" / "pbmc_demo_uce_adata.h5ad"
    r = subprocess.run([sys.executable, "-m", "uce_nf.cli", "run", "--input", str(PBMC), "--species", "human",
                        "--model-dir", str(ROOT / "assets" / "demo" / "model_files"), "--output", str(full)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    f = read(full)
    np.testing.assert_allclose(e.obsm["X_uce"][f.obs["uce_input_row"].to_numpy()], f.obsm["X_uce"], rtol=0, atol=1e-6)
    size, xuce = (res / "pbmc_demo_uce.h5ad").stat().st_size, e.obsm["X_uce"].nbytes
    with h5py.File(PBMC) as h:
        obs_bytes = sum(h["obs"][k].id.get_storage_size() for k in h["obs"] if isinstance(h["obs"][k], h5py.Dataset))
    print(f"\nembeddings {size:,} B (X_uce {xuce:,} B), parquet {(res / 'pbmc_demo_uce.parquet').stat().st_size:,} B, "
          f"full {full.stat().st_size:,} B: {size / full.stat().st_size:.1%}", file=sys.stderr)
    # The issue asks for < 5 % of the full file. Not reachable here: the float32 X_uce alone is 25 %
    # of the demo's full file (64-dim model, 765 gzip-compressed genes; docs/output.md). What holds is
    # "no counts": X_uce, the input's obs and HDF5's fixed per-object overhead, nothing else.
    assert size < xuce + 2 * obs_bytes + 128 * 1024 and size < full.stat().st_size / 2, (size, xuce, obs_bytes)
