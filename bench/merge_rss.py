#!/usr/bin/env python3
"""MERGE memory: peak RSS and wall time of `uce merge` at scale, on synthetic shards (issue 12).

Builds, in --workdir:
- an input h5ad of N + N/drop_every cells with a tiny X (one count per kept cell, none for every
  (drop_every+1)-th cell, which PREPROCESS then drops as a zero-count cell), written by anndata;
- its processed h5ad by the real `uce preprocess --no-filter` (so obs['uce_input_row'] is real);
- ceil(N / shard_size) embedding shards of shard_size x dim float32 unit rows, in `uce embed`'s
  file layout (row of cell i = a fixed random unit vector number i % 4096, so results can be checked);
then runs `uce merge` in a child process per output mode and reports the child's peak RSS
(its VmHWM) and wall time, and checks sampled rows of the result.

    python bench/merge_rss.py                       # 2M cells x 1,280 dims: ~10 GB of shards, ~20-30 GB disk
    python bench/merge_rss.py --cells 1000000       # when the disk is smaller
    python bench/merge_rss.py --cells 3000 --dim 32 --shard-size 700   # smoke (tests/test_outputs.py)

A benchmark, not a timed test: numbers depend on the disk and on what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
BASE_ROWS = 4096


def uce(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "uce_nf.cli", *map(str, args)]


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def check_call(cmd: list[str]) -> None:
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")


# The child reports its own VmHWM (peak RSS of its address space) at exit. Not wait4's ru_maxrss:
# Linux carries that across fork + exec, so it would report this (large) parent's RSS instead.
HWM_WRAPPER = """
import atexit, os, sys
def _hwm():
    status = open("/proc/self/status").read()
    open(os.environ["UCE_BENCH_HWM"], "w").write(status.split("VmHWM:")[1].split()[0])
atexit.register(_hwm)
from uce_nf.cli import main
main(prog_name="uce")
"""


def measure(args: list[str], w: Path) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of `uce <args>` in a child process."""
    hwm = w / "hwm.txt"
    env = {**child_env(), "UCE_BENCH_HWM": str(hwm)}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", HWM_WRAPPER, *args], env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): uce {' '.join(args)}\n{r.stderr[-3000:]}")
    return int(hwm.read_text()) / 1024, seconds  # VmHWM is in kB


def base_rows(dim: int) -> np.ndarray:
    b = np.random.default_rng(0).normal(size=(BASE_ROWS, dim)).astype(np.float32)
    return b / np.linalg.norm(b, axis=1, keepdims=True)


def make_inputs(w: Path, n_kept: int, drop_every: int, model_dir: Path) -> dict:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import torch
    check_call(uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--output", w / "h.pt"))
    sf = torch.load(w / "h.pt", weights_only=False)
    genes = [s for s, ok in zip(sf["symbols"], sf["in_chrom_csv"].numpy()) if ok][:128]
    n_in = n_kept + n_kept // drop_every
    dropped = np.arange(n_in) % (drop_every + 1) == drop_every
    kept = np.flatnonzero(~dropped)
    indptr = np.concatenate([[0], np.cumsum(~dropped)]).astype(np.int64)
    X = sp.csr_matrix((np.ones(len(kept), np.float32), (kept % len(genes)).astype(np.int32), indptr),
                      shape=(n_in, len(genes)))
    obs = pd.DataFrame({"batch": pd.Categorical(np.where(np.arange(n_in) % 3, "b1", "b2"))},
                       index=pd.Index([f"cell{i}" for i in range(n_in)]))
    ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(w / "in.h5ad")
    del X, obs
    t0 = time.time()
    check_call(uce("preprocess", "--input", w / "in.h5ad", "--species-file", w / "h.pt", "--no-filter",
                   "--output", w / "p.h5ad", "--stats", w / "s.json"))
    st = json.loads((w / "s.json").read_text())
    assert st["cells_kept"] == len(kept), st
    return {"cells_in": n_in, "cells_kept": len(kept), "preprocess_seconds": round(time.time() - t0, 1)}


def make_shards(w: Path, n: int, dim: int, shard_size: int) -> list[Path]:
    from uce_nf.io import save_npz
    base = base_rows(dim)
    paths = []
    for k, lo in enumerate(range(0, n, shard_size)):
        hi = min(n, lo + shard_size)
        ci = np.arange(lo, hi, dtype=np.int64)
        p = w / f"bench.shard-{k:05d}.embeddings.npz"
        save_npz(p, embeddings=base[ci % BASE_ROWS], cell_index=ci, precision="float32", device="cpu",
                 seconds=1.0, oom_splits=0)
        paths.append(p)
    return paths


def check_output(path: Path, mode: str, info: dict, dim: int, drop_every: int) -> bool:
    """Sampled rows equal the synthetic embeddings; dropped cells are NaN; the parquet agrees."""
    import h5py
    base = base_rows(dim)
    n_kept, n_in = info["cells_kept"], info["cells_in"]
    rng = np.random.default_rng(1)
    cells = np.unique(rng.integers(0, n_kept, 200))
    rows = cells if mode == "full" else cells + cells // drop_every
    with h5py.File(path, "r") as f:
        x = f["obsm"]["X_uce"]
        assert x.shape == ((n_kept if mode == "full" else n_in), dim), x.shape
        assert np.array_equal(x[np.sort(rows)], base[cells % BASE_ROWS])
        assert np.array_equal(f["obs"]["uce_input_row"][np.sort(rows)], cells + cells // drop_every)
        if mode == "embeddings":
            assert np.isnan(x[drop_every]).all() and not f["obs"]["uce_embedded"][drop_every]
    if mode == "embeddings":
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(path.with_suffix(".parquet"))
        assert pf.metadata.num_rows == n_in
        g = pf.read_row_group(0, columns=["uce_input_row", "X_uce"])
        r = g.column("uce_input_row").to_numpy()
        xs = g.column("X_uce").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, dim)
        keep = (r % (drop_every + 1)) != drop_every
        assert np.array_equal(xs[keep], base[(r[keep] - r[keep] // (drop_every + 1)) % BASE_ROWS])
        assert np.isnan(xs[~keep]).all()
    return True


def cleanup(w: Path, whole: bool) -> None:
    """Remove what this script wrote (all of a temporary workdir)."""
    if whole:
        shutil.rmtree(w, ignore_errors=True)
        return
    for p in w.iterdir():
        if p.is_file() and (p.suffix in (".npz", ".h5ad", ".pt", ".parquet") or p.name in ("s.json", "hwm.txt")):
            p.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=2_000_000, help="embedded (kept) cells")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--shard-size", type=int, default=100_000, help="cells per shard (the pipeline's default)")
    ap.add_argument("--drop-every", type=int, default=20, help="one dropped input cell per this many kept ones")
    ap.add_argument("--modes", default="full,embeddings")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder in /tmp")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    ap.add_argument("--model-dir", type=Path, default=ROOT / "assets" / "demo" / "model_files")
    a = ap.parse_args()
    modes = a.modes.split(",")
    w = a.workdir or Path(tempfile.mkdtemp(prefix="uce-merge-rss-"))
    w.mkdir(parents=True, exist_ok=True)
    shard_bytes = a.cells * a.dim * 4
    need = shard_bytes * (1 + (2.2 if "embeddings" in modes else 1.1))  # shards + the largest output(s)
    free = shutil.disk_usage(w).free
    if free < need:
        sys.exit(f"{w}: {free / 1e9:.1f} GB free, the run needs ~{need / 1e9:.1f} GB; pass fewer --cells "
                 "(e.g. 1000000) or another --workdir")
    res = {"cells_kept": a.cells, "dim": a.dim, "shard_size": a.shard_size, "drop_every": a.drop_every,
           "cores": len(os.sched_getaffinity(0)), "modes": {}}
    try:
        t0 = time.time()
        res.update(make_inputs(w, a.cells, a.drop_every, a.model_dir))
        t1 = time.time()
        shards = make_shards(w, res["cells_kept"], a.dim, a.shard_size)
        res.update(n_shards=len(shards), shard_gb=round(sum(p.stat().st_size for p in shards) / 1e9, 2),
                   inputs_seconds=round(t1 - t0, 1), shards_seconds=round(time.time() - t1, 1))
        emb = sum((["--embeddings", str(p)] for p in shards), [])
        for mode in modes:
            out = w / ("bench_uce_adata.h5ad" if mode == "full" else "bench_uce.h5ad")
            args = uce("merge", "--adata", w / "p.h5ad", *emb, "--stats", w / "s.json", "--species-file", w / "h.pt",
                       "--output-mode", mode, "--output", out, *(["--input", w / "in.h5ad"] if mode == "embeddings" else []))
            rss, secs = measure(args[3:], w)
            files = [out] + ([out.with_suffix(".parquet")] if mode == "embeddings" else [])
            res["modes"][mode] = {"peak_rss_mb": round(rss, 1), "seconds": round(secs, 1),
                                  "output_gb": {p.name: round(p.stat().st_size / 1e9, 3) for p in files},
                                  "checked": check_output(out, mode, res, a.dim, a.drop_every)}
            print(f"{mode}: {res['cells_kept']:,} cells x {a.dim}: peak RSS {rss:,.0f} MB, {secs:.1f} s", flush=True)
            if not a.keep:
                for p in files:
                    p.unlink()
    finally:
        if not a.keep:
            cleanup(w, whole=a.workdir is None)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
