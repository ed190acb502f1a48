"""What one EMBED task pays before its first batch: Python + torch import, loading the species file
(projected tokens + weights, no checkpoint), building the model and reading every weight once, for the demo species file and
for species files of the real 4-layer and 33-layer shapes (synthetic weights; a human-sized vocabulary
of 20,000 genes + 4 special + 25 chromosome tokens).

    python bench/embed_load.py --work /tmp/embed_load [--layers demo,4,33] [--repeats 3]

Each measurement is a fresh `python` process, as each EMBED task is. "cold" drops the file's pages from
the page cache first (posix_fadvise DONTNEED, this file only), so the file is read from disk; "warm"
reads it again right after. The work folder's files are deleted at the end (the 33-layer one is 2.6 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

PROBE = r"""
import os, sys, time, json
t0 = time.time()
import torch
from uce_nf.embed import EmbedSettings, Embedder
from uce_nf.species import load_species
t1 = time.time()
sf = load_species(sys.argv[1])
t2 = time.time()
emb = Embedder(sf["weights"], sf, EmbedSettings(False, None, "fp32", "cpu", False))
t3 = time.time()
# every weight read once (mmap'd pages fault in here at the latest; the first batch would do it)
s = sum(float(p.sum()) for p in emb.model.parameters())
t4 = time.time()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "build_s": t3 - t2, "touch_s": t4 - t3, "total_s": t4 - t0}))
"""


def real_species_file(nlayers: int, path: Path) -> None:
    import numpy as np
    import torch
    from gpu_check import REAL, checkpoint
    from uce_nf.species import EMBED_MODULES, FORMAT, save_species
    sd = checkpoint(nlayers, device="cpu", **REAL)
    weights = {k: v.contiguous() for k, v in sd.items() if k.split(".")[0] in EMBED_MODULES}
    n_genes, n_chrom = 20_000, 25
    vocab = np.concatenate([[0, 2, 3], 4 + np.arange(n_genes), 143_574 + np.arange(n_chrom)]).astype(np.int64)
    cfg = dict(nlayers=nlayers, d_model=REAL["d_model"], nhead=REAL["nhead"], d_hid=REAL["d_hid"],
               token_dim=REAL["token_dim"], output_dim=REAL["output_dim"], max_len=1536)
    save_species({"format": FORMAT, "species": "human", "symbols": [f"G{i}" for i in range(n_genes)],
                  "vocab": torch.from_numpy(vocab), "projected": torch.randn(len(vocab), REAL["d_model"]),
                  "weights": weights, "model": {"file": f"{nlayers}layer.torch", "sha256": "", "size": 0, "config": cfg}},
                 path)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def probe(path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--layers", default="demo,4,33")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo-model-dir", type=Path, default=ROOT / "assets" / "demo" / "model_files")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind in a.layers.split(","):
        path = a.work / f"{kind}.species.pt"
        if kind == "demo":
            subprocess.run([sys.executable, "-m", "uce_nf.cli", "prepare-species", "--species", "human", "--model-dir",
                            str(a.demo_model_dir), "--output", str(path)], check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        else:
            t = time.time()
            real_species_file(int(kind), path)
            print(f"{kind}: wrote {path.stat().st_size / 2**20:.0f} MiB in {time.time() - t:.0f} s", flush=True)
        rows = []
        for _ in range(a.repeats):
            drop_cache(path)
            cold = probe(path)
            warm = probe(path)
            rows.append({"cold": cold, "warm": warm})
        med = lambda k, w: sorted(r[w][k] for r in rows)[len(rows) // 2]  # noqa: E731
        results[kind] = {"size_mib": round(path.stat().st_size / 2**20, 1),
                         **{f"{w}_{k}": round(med(k, w), 2) for w in ("cold", "warm")
                            for k in ("import_s", "load_s", "build_s", "touch_s", "total_s")}}
        print(kind, json.dumps(results[kind]), flush=True)
        path.unlink()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
