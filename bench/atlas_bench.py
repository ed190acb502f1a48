#!/usr/bin/env python3
"""ATLAS memory and time: peak RSS and wall time of `uce atlas` on synthetic MERGE-like inputs (issue 14).

Builds, in --workdir, --samples h5ad files in the layout of MERGE's full output (obs with
uce_input_row, uce_input_name and a cell_type column; obsm['X_uce'] float32 unit rows, written in
blocks with h5py so the generator itself stays small): cells of --types cell types, each type a
random unit direction plus Gaussian noise, each sample shifted by a small sample-specific vector (a
batch effect). Then runs `uce atlas` in a child process (the first sample as label-transfer
reference) and reports the child's peak RSS (VmHWM, as bench/merge_rss.py) and wall time, plus the
timings and graph cost from atlas_summary.json.

    python bench/atlas_bench.py --cells 200000                 # 200k x 1,280: ~1 GB of inputs
    python bench/atlas_bench.py --cells 2000000 --samples 4    # the memory claim: ~10 GB of inputs
    python bench/atlas_bench.py --cells 3000 --dim 32          # smoke

A benchmark, not a timed test: numbers depend on the disk and on what else runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
from merge_rss import measure  # noqa: E402


def make_sample(path: Path, n: int, dim: int, centres: np.ndarray, shift: np.ndarray, seed: int, *,
                noise: float = 0.6, embeddings_mode: bool = False, block: int = 20_000) -> np.ndarray:
    """One MERGE-like file; returns its cells' type codes. In embeddings mode every 10th row is a
    NaN row with obs['uce_embedded'] False, as MERGE writes for cells the filters dropped."""
    try:
        from anndata.io import write_elem
    except ImportError:  # pragma: no cover
        from anndata.experimental import write_elem
    rng = np.random.default_rng(seed)
    types = rng.integers(0, len(centres), n)
    embedded = (np.arange(n) % 10 != 9) if embeddings_mode else np.ones(n, dtype=bool)
    names = np.array([f"cell{i}" for i in range(n)], dtype=object)
    obs = pd.DataFrame({"uce_input_row": np.arange(n, dtype=np.int64), "uce_input_name": names,
                        "cell_type": pd.Categorical.from_codes(types, [f"type{t:02d}" for t in range(len(centres))])},
                       index=pd.Index(names))
    if embeddings_mode:
        obs["uce_embedded"] = embedded
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=pd.Index([], dtype=object)))
        for key in ("uns", "layers", "varm", "obsp", "varp", "obsm"):
            write_elem(f, key, {})
        ds = f["obsm"].create_dataset("X_uce", shape=(n, dim), dtype=np.float32, chunks=(min(n, 400), dim))
        ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        for s in range(0, n, block):
            e = min(n, s + block)
            x = centres[types[s:e]] + shift + noise / np.sqrt(dim) * rng.standard_normal((e - s, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            x[~embedded[s:e]] = np.nan
            ds[s:e] = x.astype(np.float32)
    return types


def make_inputs(workdir: Path, cells: int, samples: int, dim: int, types: int, seed: int = 0,
                batch: float = 0.3, embeddings_mode: bool = False) -> list[Path]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((types, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    paths = []
    for s in range(samples):
        shift = batch * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
        p = workdir / f"s{s}_uce_adata.h5ad"
        make_sample(p, cells // samples, dim, centres, shift, seed + 1 + s, embeddings_mode=embeddings_mode)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--types", type=int, default=12)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the inputs and the atlas")
    ap.add_argument("--atlas-args", default="", help="extra `uce atlas` options, e.g. '--umap-max-cells 20000'")
    a = ap.parse_args()
    w = Path(a.workdir or tempfile.mkdtemp(prefix="atlas-bench-"))
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    paths = make_inputs(w, a.cells, a.samples, a.dim, a.types)
    gen = time.time() - t0
    args = ["atlas", "--output-dir", w / "atlas", "--reference-sample", "s0", "--label-column", "cell_type",
            *a.atlas_args.split()]
    for i, p in enumerate(paths):
        args += ["--adata", p, "--sample", f"s{i}", "--species", "human"]
    import os
    load = os.getloadavg()
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss, wall = measure([str(x) for x in args], w)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summ = json.loads((w / "atlas" / "atlas_summary.json").read_text())
    out = {"cells": summ["n_cells"], "dim": a.dim, "samples": a.samples, "peak_rss_mb": round(rss), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "load_before": [round(x, 2) for x in load], "load_after": [round(x, 2) for x in os.getloadavg()],
           "generate_s": round(gen, 1), "timings": summ["timings"], "neighbour_graph": summ["neighbour_graph"],
           "umap": summ["umap"], "metrics_cells": summ["metrics_cells"], "metrics": summ["metrics"],
           "holdout_accuracy": summ["label_transfer"]["holdout_accuracy"],
           "query_accuracy": {q: r.get("accuracy") for q, r in summ["label_transfer"]["queries"].items()},
           "atlas_bytes": (w / "atlas" / "uce_atlas.h5ad").stat().st_size}
    print(json.dumps(out, indent=2))
    if not a.keep:
        import shutil
        shutil.rmtree(w)


if __name__ == "__main__":
    main()
