"""Wall time of a -stub-run over N datasets (issue 12: 500): the real channel graph (one VALIDATE per
dataset, SPECIES_VOCAB/PREPARE_SPECIES per species, 2 stub shards -> 2 EMBED per dataset), with the
tasks' work replaced by their stubs. What it measures is Nextflow's own cost per task and per dataset.

    python bench/stub_many.py --work /tmp/stub500 [--datasets 500] [--profile test] [--executor-cpus 8]

--executor-cpus sets the local executor's slots (default: the machine's cores); stub tasks only
touch files, so more slots than cores measures the graph rather than the core count.
--small gives every dataset one stub shard of 10 cells instead: all datasets are small, so they
go through EMBED packing (--embed_pack_cells) and each species waits for all its SENTENCES.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from nf_utils import read_trace, run_pipeline, simple_name  # noqa: E402
from test_many_datasets import many_inputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--datasets", type=int, default=500)
    ap.add_argument("--profile", default="test")
    ap.add_argument("--executor-cpus", type=int, default=None)
    ap.add_argument("--small", action="store_true", help="one 10-cell stub shard per dataset: packed EMBED")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    sheet, models = many_inputs(a.work, a.datasets)
    out = a.work / "out"
    extra = []
    if a.executor_cpus:
        (a.work / "executor.config").write_text(f"executor {{\n    cpus = {a.executor_cpus}\n}}\n")
        extra = ["-c", str(a.work / "executor.config")]
    if a.small:
        (a.work / "small.config").write_text("process {\n    withName: 'SENTENCES' { ext.stub_shards = 1 }\n}\n")
        extra += ["-c", str(a.work / "small.config")]
    t0 = time.time()
    r = run_pipeline(a.work, *extra, "-stub-run", "--input", str(sheet), "--model_dir", str(models), "--outdir",
                     str(out), "--trace_report_suffix", "stub", profile=a.profile, timeout=6 * 3600)
    wall = time.time() - t0
    if r.returncode != 0:
        sys.exit(f"nextflow failed ({r.returncode}):\n{r.stdout[-3000:]}")
    rows = read_trace(out, "stub")
    res = {"datasets": a.datasets, "small": a.small, "executor_cpus": a.executor_cpus, "wall_s": round(wall, 1),
           "tasks": len(rows), "per_task_s": round(wall / len(rows), 3),
           "counts": dict(Counter(simple_name(x) for x in rows)), "statuses": dict(Counter(x["status"] for x in rows))}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
