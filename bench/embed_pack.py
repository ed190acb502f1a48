"""What packing small datasets into shared EMBED tasks (--embed_pack_cells) saves: N small human
datasets (pbmc demo slices of 60 + 3i cells, the demo model) through the real pipeline (-profile
test, CPU), packed (the default) and unpacked (--embed_pack_cells 0), each from scratch in its own
work dir. Reports the EMBED task count, their summed realtime and CPU time from the trace, each
task's fixed cost (realtime minus the seconds `uce embed` spent in its batches), the run's wall time
and the load average sampled during the runs (the machine may be shared).

    python bench/embed_pack.py --work /tmp/embed_pack [--datasets 12] [--order on,off]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from nf_utils import PBMC, ensure_demo, read_trace, run_pipeline, simple_name  # noqa: E402
from uce_nf.report_trace import parse_duration  # noqa: E402


def make_inputs(work: Path, n: int) -> Path:
    import anndata as ad
    pbmc = ad.read_h5ad(PBMC)
    rows = ["sample,h5ad,species"]
    for i in range(n):
        lo, size = (55 * i) % (pbmc.n_obs - 100), 60 + 3 * i
        path = work / "data" / f"d{i:02d}.h5ad"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            pbmc[lo:lo + size].copy().write_h5ad(path)
        rows.append(f"d{i:02d},{path},human")
    sheet = work / "sheet.csv"
    sheet.write_text("\n".join(rows) + "\n")
    return sheet


class LoadSampler:
    """1-minute load average every 5 s while a run goes."""

    def __init__(self):
        self.samples, self._stop = [], threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(5):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self.samples.append(os.getloadavg()[0])
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def embed_stats(rows: list[dict]) -> dict:
    tasks = []
    for r in rows:
        if simple_name(r) != "EMBED":
            continue
        real = parse_duration(r["realtime"])
        files = sorted(Path(r["workdir"]).glob("*.embeddings.npz"))
        batches = sum(float(np.load(f)["seconds"]) for f in files)
        cells = sum(len(np.load(f)["cell_index"]) for f in files)
        tasks.append({"tag": r["tag"], "shards": len(files), "cells": cells, "realtime_s": real,
                      "cpu_s": real * float(r["%cpu"].rstrip("%")) / 100, "embed_s": round(batches, 2),
                      "fixed_s": round(real - batches, 2)})
    return {"tasks": len(tasks), "realtime_s": round(sum(t["realtime_s"] for t in tasks), 1),
            "cpu_s": round(sum(t["cpu_s"] for t in tasks), 1), "embed_s": round(sum(t["embed_s"] for t in tasks), 1),
            "fixed_s_per_task": sorted(t["fixed_s"] for t in tasks), "per_task": tasks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--datasets", type=int, default=12)
    ap.add_argument("--order", default="on,off", help="runs in this order: on (packed, default), off (--embed_pack_cells 0)")
    a = ap.parse_args()
    ensure_demo()
    a.work.mkdir(parents=True, exist_ok=True)
    sheet = make_inputs(a.work, a.datasets)
    res = {"datasets": a.datasets, "cpus": len(os.sched_getaffinity(0)), "runs": []}
    for k, mode in enumerate(a.order.split(",")):
        launch = a.work / f"run{k}_{mode}"
        with LoadSampler() as load:
            t0 = time.time()
            r = run_pipeline(launch, "--input", str(sheet), "--outdir", str(launch / "out"), "--atlas", "false",
                             "--skip_multiqc", "--embed_pack_cells", "100000" if mode == "on" else "0",
                             "--trace_report_suffix", "run", timeout=4 * 3600)
            wall = time.time() - t0
        if r.returncode != 0:
            sys.exit(f"nextflow failed ({r.returncode}):\n{r.stdout[-3000:]}")
        rows = read_trace(launch / "out", "run")
        res["runs"].append({"packing": mode, "wall_s": round(wall, 1), "tasks": len(rows),
                            "load_1min": {"min": min(load.samples), "mean": round(sum(load.samples) / len(load.samples), 1),
                                          "max": max(load.samples)},
                            "embed": embed_stats(rows)})
        print(json.dumps(res["runs"][-1], indent=1), flush=True)
    (a.work / "result.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
