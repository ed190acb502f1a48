"""Per-step storage and resources of one big dataset, for the "10M cells on paper" table of
docs/benchmarks.md (a script, not a test).

Runs `uce preprocess`, `uce index` and `uce sentences` (default mode) as separate processes on an
N-cell synthetic 20,000-gene h5ad (bench/make_data.py), each with every worker count asked for,
and records per run: wall s, CPU s of the process and its workers (os.wait4), the process' own peak
RSS, the peak RSS/PSS summed over its process tree, the 1-minute load average before and after,
and the size of what it wrote. Input, processed file and sentences are deleted at the end unless
--keep. MERGE is measured by bench/merge_rss.py (it needs no counts).

    python bench/scale_paper.py --work /work/scalebench --n-cells 1000000 --preprocess-workers 1,2 \
        --sentences-workers 1,2 --out /work/scalebench/scale_1m.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(ROOT / "bench"))
from measure import measure  # noqa: E402

PY = sys.executable
UCE = [PY, "-m", "uce_nf.cli"]


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def run(log: Path, *args) -> dict:
    return measure([[*UCE, *map(str, args)]], log)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="holds g20k/model_files and g20k.species.pt")
    p.add_argument("--n-cells", type=int, required=True)
    p.add_argument("--preprocess-workers", default="1")
    p.add_argument("--sentences-workers", default="2")
    p.add_argument("--shard-size", type=int, default=100_000)
    p.add_argument("--keep", action="store_true", help="keep input, processed file and sentences")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    w, n = a.work, a.n_cells
    sf, model = w / "g20k.species.pt", w / "g20k" / "model_files"
    h5 = w / f"syn_{n}.h5ad"
    logs = w / f"logs_{n}"
    r = {"n_cells": n, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count()}
    if not h5.exists():
        r["make_data"] = measure([[PY, ROOT / "bench" / "make_data.py", "--model-dir", model, "--pbmc",
                                   ROOT / "assets" / "demo" / "pbmc_demo.h5ad", "--n-cells", n, "--output", h5]],
                                 logs / "make_data")[0]
    r["input_bytes"] = size(h5)
    proc = w / f"proc_{n}.h5ad"
    for k in map(int, a.preprocess_workers.split(",")):
        out = w / f"proc_{n}_w{k}.h5ad"
        r[f"preprocess_w{k}"] = run(logs / f"preprocess_w{k}", "preprocess", "--input", h5, "--species-file", sf,
                                    *(["--workers", k] if k > 1 else []), "--output", out, "--stats", w / f"stats_{n}_w{k}.json")
        r[f"preprocess_w{k}"]["output_bytes"] = size(out)
        r[f"preprocess_w{k}"]["stats"] = json.loads((w / f"stats_{n}_w{k}.json").read_text())
        if proc.exists():
            out.unlink()
        else:
            out.rename(proc)
        a.out.write_text(json.dumps(r, indent=1))
    if not a.keep:
        h5.unlink()  # the input is no longer needed: frees the disk for the next size
    idx = w / f"index_{n}.npz"
    r["index"] = run(logs / "index", "index", "--adata", proc, "--species-file", sf, "--output", idx)
    for k in map(int, a.sentences_workers.split(",")):
        d = w / f"sent_{n}_w{k}"
        shutil.rmtree(d, ignore_errors=True)
        r[f"sentences_w{k}"] = run(logs / f"sentences_w{k}", "sentences", "--adata", proc, "--index", idx, "--seed", 0,
                                   "--compat", "none", "--workers", k, "--shard-size", a.shard_size,
                                   "--output-dir", d, "--name", "syn")
        r[f"sentences_w{k}"]["output_bytes"] = size(d)
        r[f"sentences_w{k}"]["log_tail"] = (logs / f"sentences_w{k}.log").read_text().splitlines()[-3:]
        if not a.keep:
            shutil.rmtree(d)
        a.out.write_text(json.dumps(r, indent=1))
    if not a.keep:
        for f in (proc, idx):
            f.unlink()
    r["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    a.out.write_text(json.dumps(r, indent=1))
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
