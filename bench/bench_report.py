"""Results of bench/run_bench.py as a markdown table, with the machine and package versions."""

from __future__ import annotations

import os
import platform

def versions() -> dict:
    import importlib.metadata as md
    v = {}
    for pkg in ("uce-nf", "uce-model", "torch", "numpy", "scipy", "anndata", "h5py"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    if v["uce-nf"] is None:  # runs from src/ (PYTHONPATH), not installed
        import uce_nf
        v["uce-nf"] = uce_nf.__version__
    return v


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}


def markdown(R: dict) -> str:
    L = [f"Machine: {R['machine']['cpu']}, {R['machine']['cores']} cores, {R['machine']['mem_gb']} GB, "
         f"GPU: {R['machine']['gpu'] or 'none'}; versions: " + ", ".join(f"{k} {v}" for k, v in R["versions"].items()),
         f"Run: {R['started']} – {R['finished']}; load average (1 min) seen before each piece: "
         f"{R['load_seen']['min']:.1f}–{R['load_seen']['max']:.1f} on {R['machine']['cores']} cores.", ""]
    L += ["| what | reference | ours | ratio (wall) | ratio (CPU s) | peak RSS ref / ours (MB) | notes |", "|---|---|---|---|---|---|---|"]
    s = R.get("sentences")
    if s:
        ref = s["reference"]
        for label, name in (("compat", "compat `reference`, 1 process"), ("default_w1", "default `none`, 1 worker"),
                            ("default_w2", "default `none`, 2 workers")):
            o = s[label]
            L.append(f"| sentences cells/s, {name} | {ref['cells_per_s']:.1f} | {o['cells_per_s']:.0f} | {o['speedup_wall']}x | "
                     f"{o['speedup_cpu']}x | {ref['peak_rss_mb']:.0f} / {o['peak_tree_rss_mb']:.0f} | "
                     f"{s['dataset']['genes']} genes; ref {ref['cells']} cells, ours {o['cells']} |")
        L.append(f"| compat sentences identical to the reference ({ref['cells']} cells) | | | | | | "
                 f"{s['compat_identical_to_reference']} |")
    for f in (v for k, v in R.items() if k == "forward" or k.startswith("forward_")):
        ref = f["reference"]
        for label, name in (("compat", "compat `reference` (fp32)"), ("default_fp32", "default `none` (fp32)"),
                            ("default_bf16", "default `none` (bf16)")):
            if label not in f:
                continue
            o = f[label]
            L.append(f"| forward cells/s, {f.get('layers', 4)}-layer, {name}, batch {f['batch_size']}{', ' + f['device'] if f.get('device', 'cpu') != 'cpu' else ''} | {ref['cells_per_s']:.3f} | {o['cells_per_s']:.3f} | "
                     f"{o['speedup_wall']}x | {o['speedup_cpu']}x | {ref['peak_rss_mb']:.0f} / {o['peak_rss_mb']:.0f} | "
                     f"{f['cells']} cells, mean length {o['mean_length']:.0f}"
                     + (f"; peak GPU memory ref / ours {ref['peak_gpu_mb']:.0f} / {o['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in o else "")
                     + " |")
        L.append(f"| {f.get('layers', 4)}-layer compat forward vs reference: min cosine | | | | | | {f['compat_min_cosine_vs_reference']:.8f} "
                 f"(max abs diff {f['compat_max_abs_diff']:.2e}) |")
        if "bf16_vs_fp32_min_cosine" in f:
            L.append(f"| {f.get('layers', 4)}-layer default bf16 vs fp32: min cosine | | | | | | {f['bf16_vs_fp32_min_cosine']:.6f} |")
    for tag, e in (R.get("e2e") or {}).items():
        ref = e["reference"]
        for mode in ("reference", "none"):
            o = e[f"ours_{mode}"]
            L.append(f"| end to end `uce run --compat {mode}` vs reference flow, {tag} | {ref['wall_s']:.1f} s | {o['wall_s']:.1f} s | "
                     f"{o['speedup_wall']}x | {o['speedup_cpu']}x | {ref['peak_rss_mb']:.0f} / {o['peak_tree_rss_mb']:.0f} | "
                     f"{e['cells']} cells" + (f"; min cosine {e['compat_min_cosine_vs_reference']:.8f}" if mode == "reference" else "") + " |")
    for tag, p in (R.get("padding") or {}).items():
        L.append(f"| padding fraction, {tag} | | | | | | " + "; ".join(
            f"batch {k[2:]}: consecutive {v['compat_consecutive']:.4f}, bucketed {v['default_bucketed']:.6f}"
            for k, v in p.items() if k.startswith("bs")) + f" (lengths {p['min']}–{p['max']}) |")
    pe = R.get("parallel_embed")
    if pe:
        L.append("| parallel EMBED tasks (CPU, real shapes, default fp32): cells/s | | " + "; ".join(
            f"{k} task(s): {pe[f'tasks_{k}']['cells_per_s']:.3f}" for k in (1, 2, 4)) + " | | | | "
            f"{pe['cells_per_task']} cells per task"
            + ("; threads per task " + "/".join(str(pe[f"tasks_{k}"]["threads_per_task"]) for k in (1, 2, 4))
               if "threads_per_task" in pe["tasks_1"] else "") + " |")
    for n, row in (R.get("scale") or {}).items():
        L.append(f"| scale {int(n):,} cells x 20k genes ({row['input_gb']} GB): peak RSS (MB) | | preprocess "
                 f"{row['preprocess']['peak_rss_mb']:.0f}, index {row['index']['peak_rss_mb']:.0f}, sentences none/2 workers "
                 f"{row['sentences_none']['peak_tree_rss_mb']:.0f} (RSS summed over the process tree"
                 + (f"; PSS {row['sentences_none']['peak_tree_pss_mb']:.0f}" if "peak_tree_pss_mb" in row["sentences_none"] else "")
                 + f"), sentences compat reference/1 process {row['sentences_reference']['peak_rss_mb']:.0f} | | | | "
                 f"cells/s: preprocess {row['preprocess']['cells_per_s']:.0f}, sentences none {row['sentences_none']['cells_per_s']:.0f}, "
                 f"sentences compat reference {row['sentences_reference']['cells_per_s']:.0f} |")
    g = R.get("gpu_paths_on_cpu")
    if g:
        L.append("| GPU code paths on CPU | | " + "; ".join(f"{k}: {'ok' if v.get('ok') else 'FAILED'}" for k, v in g.items()) + " | | | | |")
    return "\n".join(L) + "\n"


def _walk(o, key):
    if isinstance(o, dict):
        for k, v in o.items():
            if k == key:
                yield v
            else:
                yield from _walk(v, key)
    elif isinstance(o, list):
        for v in o:
            yield from _walk(v, key)
