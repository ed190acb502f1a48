"""uce-nf benchmark harness (scripts, not timed tests): ours vs the reference (uce-model 0.1.4),
side by side, same data, same machine, one run. Every measured piece runs in its own subprocess;
per process we record wall seconds, CPU seconds (user+sys of the process and its workers, from
os.wait4 / RUSAGE_CHILDREN) and peak RSS (ru_maxrss of the process, and the peak of the summed RSS
of its whole process tree, sampled every 0.1 s, for the multi-process modes). The load average is
recorded before and after each piece, because other jobs may share the CPU.

    /root/.cache/uce-nf/venv/bin/python bench/run_bench.py --work /tmp/bench --out bench/results
    ... --only sentences,forward,e2e,padding,parallel,scale,gpu_paths    (default: all)
    ... --quick        tiny sizes, for the smoke test (numbers meaningless)

Data (see bench/make_data.py): a synthetic 20,000-gene dataset built from bootstrapped real pbmc
counts (~1,950 expressed genes per cell), vocabulary from `uce make-demo --n-human-genes 20000`;
the real-shape model (`uce make-demo --d-model 1280 --d-hid 5120 --token-dim 5120 --output-dim 1280
--nlayers 4`, synthetic weights, demo vocabulary of 6,368 tokens) on real-length sentences (~1,075
tokens) of the pbmc demo cells. Writes OUT/results.json and OUT/results.md.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# this checkout's engine, in this process and in every subprocess (the venv may hold dependencies only)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(ROOT / "src"))
PY = sys.executable
UCE = [PY, "-m", "uce_nf.cli"]
TASKS = str(ROOT / "bench" / "tasks.py")
sys.path.insert(0, str(ROOT / "bench"))
from bench_report import _walk, machine, markdown, versions  # noqa: E402
from measure import measure  # noqa: E402


# ----------------------------------------------------------------------------- measurement

def task(name: str, log: Path, **kw) -> dict:
    return measure([[PY, TASKS, name, json.dumps(kw)]], log)[0]


def uce(*args, log: Path) -> dict:
    return measure([[*UCE, *map(str, args)]], log)[0]


# ----------------------------------------------------------------------------- set-up

def setup(work: Path, q: bool) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    demo = Path(os.environ.get("UCE_NF_DEMO", ROOT / "assets" / "demo"))
    if not (demo / "model_files" / "4layer_model.torch").exists():
        demo = work / "demo"
        if not (demo / "model_files" / "4layer_model.torch").exists():
            subprocess.run([*UCE, "make-demo", "--dest", demo], check=True)
    paths = {"demo": demo, "pbmc": demo / "pbmc_demo.h5ad", "g20k": work / "g20k" / "model_files",
             "real": work / "real" / "model_files"}
    if q:  # smoke test: the demo vocabulary (4,000 human genes) and 2,000-gene data
        paths["g20k"] = demo / "model_files"
    elif not (paths["g20k"] / "4layer_model.torch").exists():
        subprocess.run([*UCE, "make-demo", "--dest", work / "g20k", "--n-human-genes", "20000", "--no-data"], check=True)
    layers = FORWARD["layers"]
    if layers != 4:  # the real shapes with another depth (33: the large model), in its own folder
        paths["real"] = work / f"real{layers}" / "model_files"
    paths["real_checkpoint"] = f"{layers}layer_model.torch"
    if not q and not (paths["real"] / paths["real_checkpoint"]).exists():
        subprocess.run([*UCE, "make-demo", "--dest", paths["real"].parent, "--d-model", "1280", "--d-hid", "5120",
                        "--token-dim", "5120", "--output-dim", "1280", "--nlayers", str(layers),
                        "--checkpoint-name", paths["real_checkpoint"], "--no-data"], check=True)
    return paths


def syn(work: Path, paths: dict, n: int, n_genes: int = 20_000) -> Path:
    out = work / f"syn_{n}.h5ad" if n_genes == 20_000 else work / f"syn_{n}_{n_genes}g.h5ad"
    if not out.exists():
        subprocess.run([PY, ROOT / "bench" / "make_data.py", "--model-dir", paths["g20k"], "--pbmc", paths["pbmc"],
                        "--n-cells", str(n), "--n-genes", str(n_genes), "--output", out], check=True)
    return out


def species_file(work: Path, model_dir: Path, tag: str, model: str = "4layer_model.torch") -> Path:
    sf = work / f"{tag}.species.pt"
    if not sf.exists():
        subprocess.run([*UCE, "prepare-species", "--species", "human", "--model-dir", model_dir, "--model", model,
                        "--output", sf], check=True)
    return sf


def processed(work: Path, h5ad: Path, sf: Path, tag: str) -> tuple[Path, Path]:
    d = work / f"proc_{tag}"
    d.mkdir(exist_ok=True)
    if not (d / "i.npz").exists():
        subprocess.run([*UCE, "preprocess", "--input", h5ad, "--species-file", sf, "--output", d / "p.h5ad",
                        "--stats", d / "s.json"], check=True)
        subprocess.run([*UCE, "index", "--adata", d / "p.h5ad", "--species-file", sf, "--output", d / "i.npz"], check=True)
    return d / "p.h5ad", d / "i.npz"


def load_sentences(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ----------------------------------------------------------------------------- sections

def bench_sentences(work, paths, q, R):
    n_ours, n_ref, n_genes = (200, 50, 2000) if q else (20_000, 3_000, 20_000)
    big = syn(work, paths, n_ours, n_genes)
    small = big.with_name(big.name.replace(".h5ad", f"_first{n_ref}.h5ad"))
    if not small.exists():
        import anndata as ad
        ad.read_h5ad(big, backed="r")[:n_ref].to_memory().write_h5ad(small)
    sf = species_file(work, paths["g20k"], "g20k")
    p_big, i_big = processed(work, big, sf, f"big{n_ours}")
    p_small, i_small = processed(work, small, sf, f"small{n_ref}")
    logs = work / "logs"
    refdir = work / f"ref_sent_{n_ref}"
    if not (refdir / "meta.json").exists():
        task("ref_prepare", logs / "ref_prepare", h5ad=str(small), model_dir=str(paths["g20k"]), workdir=str(refdir))
    r = {"dataset": {"cells": n_ours, "genes": n_genes, "ref_cells": n_ref,
                     "nnz_per_cell": float(np.mean(np.diff(_indptr(p_big))))}}
    r["reference"] = task("ref_sentences", logs / "ref_sentences", workdir=str(refdir), model_dir=str(paths["g20k"]),
                          n_cells=n_ref, save=str(work / "ref_sentences.npz"))
    shutil.rmtree(work / "sent_exact", ignore_errors=True)
    exact = task("our_sentences", logs / "our_compat_small", adata=str(p_small), index=str(i_small),
                 out_dir=str(work / "sent_exact"), compat=True, workers=1)
    ref_s, our_s = load_sentences(work / "ref_sentences.npz"), load_sentences(exact["shards"][0])
    r["compat_identical_to_reference"] = bool(np.array_equal(ref_s["offsets"], our_s["offsets"])
                                              and np.array_equal(ref_s["tokens"], our_s["tokens"]))
    r["compat_same_cells"] = exact
    for label, compat, workers in (("compat", True, 1), ("default_w1", False, 1), ("default_w2", False, 2)):
        shutil.rmtree(work / f"sent_{label}", ignore_errors=True)
        r[label] = task("our_sentences", logs / f"our_{label}", adata=str(p_big), index=str(i_big),
                        out_dir=str(work / f"sent_{label}"), compat=compat, workers=workers)
    ref = r["reference"]
    for label in ("compat", "default_w1", "default_w2", "compat_same_cells"):
        r[label]["speedup_wall"] = round(r[label]["cells_per_s"] / ref["cells_per_s"], 2)
        r[label]["speedup_cpu"] = round((r[label]["cells"] / r[label]["task_cpu_s"]) / (ref["cells"] / ref["task_cpu_s"]), 2)
    R["sentences"] = r


def _indptr(p):
    import h5py
    with h5py.File(p, "r") as f:
        return f["X/indptr"][:]


def real_sentences(work, paths, q):
    """Real-length sentences (compat, seed 0) of the pbmc demo cells, tokens of the real-shape model.
    Returns (model folder, checkpoint file name, species file, sentences file)."""
    model, ckpt = (paths["demo"] / "model_files", "4layer_model.torch") if q else (paths["real"], paths["real_checkpoint"])
    tag = "demo" if q else paths["real"].parent.name
    sf = species_file(work, model, tag, ckpt)
    p, i = processed(work, paths["pbmc"], sf, f"pbmc_{tag}")
    d = work / f"sent_pbmc_{tag}"
    if not (d / "pbmc.shard-00000.sentences.npz").exists():
        subprocess.run([*UCE, "sentences", "--adata", p, "--index", i, "--seed", "0", "--compat", "reference",
                        "--batch-size", "25", "--output-dir", d, "--name", "pbmc"], check=True)
    return model, ckpt, sf, d / "pbmc.shard-00000.sentences.npz"


DEVICE = "cpu"  # --device: where the forward section runs (ours and the reference alike)
FORWARD = {"layers": 4, "cells": 50, "batch": 25, "bf16": False}  # --forward-*: GPU runs want more cells


def bench_forward(work, paths, q, R):
    model, ckpt, sf, sent = real_sentences(work, paths, q)
    layers = 4 if q else FORWARD["layers"]
    n, bs = (10, 5) if q else (FORWARD["cells"], FORWARD["batch"])
    logs = work / "logs"
    r = {"cells": n, "batch_size": bs, "precision": "fp32", "device": DEVICE, "layers": layers,
         "model": f"{layers}-layer, d_model 1280, 20 heads, FFN 5120, token_dim 5120 (synthetic weights, "
                  "6,368-token demo vocabulary)" if not q else "demo"}
    common = dict(model_dir=str(model), model=ckpt, sentences=str(sent), n_cells=n, batch_size=bs, device=DEVICE)
    r["reference"] = task("ref_forward", logs / "ref_forward", save=str(work / "ref_fwd.npy"), **common)
    r["compat"] = task("our_forward", logs / "our_forward_compat", species_file=str(sf), compat=True,
                       save=str(work / "our_fwd.npy"), **common)
    r["default_fp32"] = task("our_forward", logs / "our_forward_default", species_file=str(sf), compat=False,
                             save=str(work / "our_fwd_default.npy"), **common)
    if DEVICE != "cpu" or q or FORWARD["bf16"]:  # the GPU default, bf16 autocast (slow on CPU: there on request)
        r["default_bf16"] = task("our_forward", logs / "our_forward_bf16", species_file=str(sf), compat=False,
                                 precision="bf16", save=str(work / "our_fwd_bf16.npy"), **common)
        bf16_cos = cosines(np.load(work / "our_fwd_bf16.npy"), np.load(work / "our_fwd_default.npy"))
        r["bf16_vs_fp32_min_cosine"] = float(bf16_cos.min())
    cos = cosines(np.load(work / "our_fwd.npy"), np.load(work / "ref_fwd.npy"))
    r["compat_min_cosine_vs_reference"] = float(cos.min())
    r["compat_max_abs_diff"] = float(np.abs(np.load(work / "our_fwd.npy") - np.load(work / "ref_fwd.npy")).max())
    for label in [k for k in ("compat", "default_fp32", "default_bf16") if k in r]:
        r[label]["speedup_wall"] = round(r[label]["cells_per_s"] / r["reference"]["cells_per_s"], 3)
        r[label]["speedup_cpu"] = round(r["reference"]["task_cpu_s"] / r[label]["task_cpu_s"], 3)
    R["forward" if layers == 4 else f"forward_{layers}layer"] = r


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return float(1 - lengths.sum() / padded)


def bench_padding(work, paths, q, R):
    r = {}
    for tag, path in (("pbmc_real_shape_compat_sentences", real_sentences(work, paths, q)[3]),
                      ("syn20k_default_sentences", next((work / "sent_default_w2").glob("*.sentences.npz"), None))):
        if path is None:
            continue
        lengths = np.diff(load_sentences(path)["offsets"])
        n = len(lengths)
        row = {"cells": n, "mean_length": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max())}
        for bs in (25, 64, 256):
            consecutive = [np.arange(s, min(s + bs, n)) for s in range(0, n, bs)]
            order = np.argsort(lengths, kind="stable")
            bucketed = [order[s:s + bs] for s in range(0, n, bs)]
            row[f"bs{bs}"] = {"compat_consecutive": round(padding_fraction(lengths, consecutive), 5),
                              "default_bucketed": round(padding_fraction(lengths, bucketed), 6)}
        r[tag] = row
    R["padding"] = r


def bench_e2e(work, paths, q, R):
    logs = work / "logs"
    r = {}
    cases = [("pbmc_demo_model", paths["pbmc"], paths["demo"] / "model_files")]
    if not q:
        first = work / "syn_20000_first3000.h5ad"
        if first.exists():
            cases.append(("syn3k_20kgenes_g20k_model", first, paths["g20k"]))
    for tag, h5ad, model in cases:
        row = {"input": str(h5ad), "model_dir": str(model)}
        shutil.rmtree(work / f"e2e_ref_{tag}", ignore_errors=True)
        row["reference"] = task("ref_e2e", logs / f"e2e_ref_{tag}", h5ad=str(h5ad), model_dir=str(model),
                                workdir=str(work / f"e2e_ref_{tag}"), save=str(work / f"e2e_ref_{tag}.npz"))
        for mode in ("reference", "none"):
            out = work / f"e2e_ours_{tag}_{mode}.h5ad"
            row[f"ours_{mode}"] = uce("run", "--input", h5ad, "--species", "human", "--model-dir", model, "--compat", mode,
                                      "--seed", "0", "--batch-size", "25", "--output", out, log=logs / f"e2e_{tag}_{mode}")
        import anndata as ad
        ref = np.load(work / f"e2e_ref_{tag}.npz", allow_pickle=True)
        ours = ad.read_h5ad(work / f"e2e_ours_{tag}_reference.h5ad")
        row["cells"] = int(ours.n_obs)
        row["compat_same_obs"] = bool(np.array_equal(np.asarray(ours.obs_names), ref["obs_names"]))
        row["compat_min_cosine_vs_reference"] = float(cosines(ours.obsm["X_uce"], ref["embeddings"]).min())
        for mode in ("reference", "none"):
            row[f"ours_{mode}"]["speedup_wall"] = round(row["reference"]["wall_s"] / row[f"ours_{mode}"]["wall_s"], 2)
            row[f"ours_{mode}"]["speedup_cpu"] = round(row["reference"]["cpu_s"] / row[f"ours_{mode}"]["cpu_s"], 2)
        r[tag] = row
    R["e2e"] = r


def bench_parallel(work, paths, q, R):
    """K concurrent `uce embed` processes on K shards (what K Nextflow EMBED tasks on one machine do).
    Each task gets cores // K threads, as Nextflow's task.cpus would give it (OMP_NUM_THREADS)."""
    model, ckpt, sf, sent = real_sentences(work, paths, q)
    n = 2 if q else 8
    s = load_sentences(sent)
    d = work / "parallel"
    d.mkdir(exist_ok=True)
    shards = []
    for k in range(4):  # 4 disjoint shards of n cells
        a, b = k * n, (k + 1) * n
        p = d / f"shard{k}.sentences.npz"
        off = s["offsets"][a:b + 1]
        np.savez(p, tokens=s["tokens"][off[0]:off[-1]], offsets=off - off[0], cell_index=s["cell_index"][a:b])
        shards.append(p)
    r = {"cells_per_task": n, "model": R.get("forward", {}).get("model", str(model)), "mode": "default (fp32 on CPU)",
         "batch_size": n}
    for k in (1, 2, 4):
        cmds = [[*UCE, "embed", "--sentences", shards[i], "--species-file", sf, "--model-dir", model,
                 "--model", ckpt, "--batch-size", str(n), "--device", "cpu", "--output", d / f"k{k}_{i}.embeddings.npz"] for i in range(k)]
        threads = max(1, (os.cpu_count() or 1) // k)
        res = measure([[str(c) for c in cmd] for cmd in cmds], work / "logs" / f"parallel_{k}",
                      env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
        wall = max(x["wall_s"] for x in res)
        r[f"tasks_{k}"] = {"wall_s": round(wall, 2), "cells": k * n, "cells_per_s": round(k * n / wall, 3),
                           "threads_per_task": threads,
                           "peak_rss_mb_per_task": max(x["peak_rss_mb"] for x in res),
                           "embed_seconds_in_task": [float(np.load(d / f"k{k}_{i}.embeddings.npz")["seconds"]) for i in range(k)],
                           "load_before": res[0]["load_before"]}
    R["parallel_embed"] = r


def bench_scale(work, paths, q, R, sizes):
    sf = species_file(work, paths["g20k"], "g20k")
    logs = work / "logs"
    r = {}
    for n in sizes:
        h5 = syn(work, paths, n)
        d = work / f"scale_{n}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        row = {"input_gb": round(h5.stat().st_size / 1e9, 2)}
        row["preprocess"] = uce("preprocess", "--input", h5, "--species-file", sf, "--output", d / "p.h5ad",
                                "--stats", d / "s.json", log=logs / f"scale_{n}_preprocess")
        row["index"] = uce("index", "--adata", d / "p.h5ad", "--species-file", sf, "--output", d / "i.npz",
                           log=logs / f"scale_{n}_index")
        for mode, workers in (("none", 2), ("reference", 1)):
            out = d / f"sent_{mode}"
            row[f"sentences_{mode}"] = uce("sentences", "--adata", d / "p.h5ad", "--index", d / "i.npz", "--seed", "0",
                                           "--compat", mode, "--workers", workers, "--shard-size", "100000",
                                           "--output-dir", out, "--name", "syn", log=logs / f"scale_{n}_sent_{mode}")
            row[f"sentences_{mode}"]["cells_per_s"] = round(n / row[f"sentences_{mode}"]["wall_s"], 1)
            shutil.rmtree(out)
        row["preprocess"]["cells_per_s"] = round(n / row["preprocess"]["wall_s"], 1)
        (d / "p.h5ad").unlink()
        r[str(n)] = row
    R["scale"] = r


def bench_gpu_paths(work, paths, q, R):
    """Every GPU-oriented path of `uce embed` runs on CPU (bf16 autocast, auto batch size, torch.compile)."""
    model, ckpt, sf, sent = real_sentences(work, paths, True)  # demo model: this checks code paths, not speed
    r = {}
    for tag, extra in (("bf16_cpu", ["--precision", "bf16"]), ("batch_size_auto", ["--batch-size", "0"]),
                       ("compile_cpu", ["--compile"])):
        out = work / f"gpu_path_{tag}.embeddings.npz"
        try:
            r[tag] = uce("embed", "--sentences", sent, "--species-file", sf, "--model-dir", model, "--model", ckpt, "--device", "cpu",
                         *extra, "--output", out, log=work / "logs" / f"gpu_path_{tag}")
            e = np.load(out)["embeddings"]
            r[tag].update(ok=bool(np.isfinite(e).all()), cells=int(len(e)))
        except RuntimeError as err:
            r[tag] = {"ok": False, "error": str(err)[-500:]}
    R["gpu_paths_on_cpu"] = r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/uce-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--only", default="sentences,forward,padding,e2e,parallel,scale,gpu_paths")
    ap.add_argument("--scale-sizes", default="50000,200000")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", help="forward section: cpu or cuda (both implementations)")
    ap.add_argument("--forward-layers", type=int, default=4, help="forward section: 4 or 33 (real shapes, synthetic weights)")
    ap.add_argument("--forward-cells", type=int, default=50, help="forward section: cells (the 700 pbmc sentences repeat)")
    ap.add_argument("--forward-batch", type=int, default=25, help="forward section: batch size")
    ap.add_argument("--forward-bf16", action="store_true", help="forward section: also bf16 autocast on CPU (always on GPU)")
    ap.add_argument("--merge", nargs="*", type=Path, default=[],
                    help="only merge these results.json files (sections of later files win) into OUT and render the table")
    a = ap.parse_args()
    if a.merge:
        R, runs = {}, [json.loads(p.read_text()) for p in a.merge]
        for r in runs:
            R.update(r)
        R["started"] = min(r["started"] for r in runs)
        R["finished"] = max(r.get("finished", r["started"]) for r in runs)
        R["command"] = " ; ".join(filter(None, (json.loads(p.read_text()).get("command") for p in a.merge)))
        loads = list(_walk(R, "load_before"))
        R["load_seen"] = {"min": min(loads, default=0), "max": max(loads, default=0)}
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "results.json").write_text(json.dumps(R, indent=1, default=str) + "\n")
        (a.out / "results.md").write_text(markdown(R))
        print(markdown(R))
        return
    global DEVICE
    DEVICE = a.device
    FORWARD.update(layers=a.forward_layers, cells=a.forward_cells, batch=a.forward_batch, bf16=a.forward_bf16)
    sections = a.only.split(",")
    R = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv), "machine": machine(),
         "versions": versions(), "quick": a.quick}
    prev = a.out / "results.json"
    if prev.exists() and not a.quick:  # keep sections not re-run this time
        old = json.loads(prev.read_text())
        R.update({k: v for k, v in old.items() if k not in R and k not in ("finished", "load_seen")})
    paths = setup(a.work, a.quick)
    run = {"sentences": lambda: bench_sentences(a.work, paths, a.quick, R),
           "forward": lambda: bench_forward(a.work, paths, a.quick, R),
           "padding": lambda: bench_padding(a.work, paths, a.quick, R),
           "e2e": lambda: bench_e2e(a.work, paths, a.quick, R),
           "parallel": lambda: bench_parallel(a.work, paths, a.quick, R),
           "scale": lambda: bench_scale(a.work, paths, a.quick, R, [int(x) for x in a.scale_sizes.split(",")]),
           "gpu_paths": lambda: bench_gpu_paths(a.work, paths, a.quick, R)}
    for name in sections:
        t0 = time.time()
        print(f"== {name}", flush=True)
        run[name]()
        print(f"   {name}: {time.time() - t0:.0f} s", flush=True)
        R["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        loads = [v for v in _walk(R, "load_before")]
        R["load_seen"] = {"min": min(loads, default=0), "max": max(loads, default=0)}
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "results.json").write_text(json.dumps(R, indent=1, default=str) + "\n")
        (a.out / "results.md").write_text(markdown(R))
    print((a.out / "results.md").read_text())


if __name__ == "__main__":
    main()
