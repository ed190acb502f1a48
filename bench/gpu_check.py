"""Device check for a rarely lent GPU machine (bare image: torch, numpy, h5py, pandas, scipy,
accelerate; no anndata, scanpy or click; no network). Needs only this repository, plus the reference's
wheel in bench/.wheels when uce-model is not installed. Run it through bench/gpu_check.sh.

It builds synthetic checkpoints in the real shapes (d_model 1280, 20 heads, d_hid 5120, token_dim
5120; 4 and 33 layers) and real-shaped sentences (CLS + 1,024 genes + 2 tokens per chromosome,
lengths 1,065-1,075), then measures on the same device and the same sentences:
- the reference's TransformerModel (fp32, consecutive batches of 25, +1 pad mask), cells/s;
- ours in compat mode (fp32) and its per-cell cosine against the reference;
- ours in default mode, fp32 and bf16 (token budget from free memory), cells/s, bf16-vs-fp32 cosine,
  token budget and peak memory;
- the OOM back-off, forced (a memory cap on GPU; a simulated CUDA OOM on CPU), and that it changes
  nothing;
- two processes claiming two different GPUs, where the machine has two.
Writes gpu_check.json and gpu_check.md into --out. `--cpu-smoke`: tiny shapes on CPU, seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from reference_model import reference_model_class  # noqa: E402
from uce_nf.embed import SIMULATE_ENV, EmbedSettings, Embedder  # noqa: E402
from uce_nf.species import project_tokens  # noqa: E402

REAL = dict(d_model=1280, nhead=20, d_hid=5120, token_dim=5120, output_dim=1280)
SMOKE = dict(d_model=64, nhead=1, d_hid=128, token_dim=32, output_dim=64)
N_GENES, N_CHROM = 20_000, 25  # vocabulary: 4 special rows, genes, chromosome tokens


def checkpoint(nlayers: int, d_model, nhead, d_hid, token_dim, output_dim, device, seed=0) -> dict:
    """State dict with the reference's keys; weights scaled so that cells differ (uce-reference §15)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g, device=device) * std

    sd = {"encoder.0.weight": rnd(d_model, token_dim, std=token_dim ** -0.5), "encoder.0.bias": rnd(d_model, std=0.05),
          "encoder.2.weight": 0.3 * (1 + 0.2 * rnd(d_model)), "encoder.2.bias": rnd(d_model, std=0.05)}
    pos = torch.arange(1536, device=device, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(1536, 1, d_model, device=device)
    pe[:, 0, 0::2], pe[:, 0, 1::2] = torch.sin(pos * inv), torch.cos(pos * inv)
    sd["pos_encoder.pe"] = pe
    for i in range(nlayers):
        p = f"transformer_encoder.layers.{i}."
        sd.update({p + "self_attn.in_proj_weight": rnd(3 * d_model, d_model, std=2 * d_model ** -0.5),
                   p + "self_attn.in_proj_bias": rnd(3 * d_model, std=0.05),
                   p + "self_attn.out_proj.weight": rnd(d_model, d_model, std=4 * d_model ** -0.5),
                   p + "self_attn.out_proj.bias": rnd(d_model, std=0.05),
                   p + "linear1.weight": rnd(d_hid, d_model, std=d_model ** -0.5), p + "linear1.bias": rnd(d_hid, std=0.05),
                   p + "linear2.weight": rnd(d_model, d_hid, std=d_hid ** -0.5), p + "linear2.bias": rnd(d_model, std=0.05)})
        for n in ("norm1", "norm2"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + 0.2 * rnd(d_model), rnd(d_model, std=0.05)
    dims = [d_model, 1024, output_dim, output_dim]
    for j, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        sd[f"decoder.{j}.0.weight"], sd[f"decoder.{j}.0.bias"] = rnd(b, a, std=a ** -0.5), rnd(b, std=0.05)
        sd[f"decoder.{j}.1.weight"], sd[f"decoder.{j}.1.bias"] = 1 + 0.2 * rnd(b), rnd(b, std=0.05)
    sd["decoder.3.weight"], sd["decoder.3.bias"] = rnd(output_dim, output_dim, std=output_dim ** -0.5), rnd(output_dim, std=0.05)
    for j, (a, b) in enumerate([(output_dim + 1280, 2048), (2048, 512), (512, 128)]):  # unused; strict load (1280 is hard-coded there)
        sd[f"binary_decoder.{j}.0.weight"], sd[f"binary_decoder.{j}.0.bias"] = torch.zeros(b, a), torch.zeros(b)
        sd[f"binary_decoder.{j}.1.weight"], sd[f"binary_decoder.{j}.1.bias"] = torch.ones(b), torch.zeros(b)
    sd["binary_decoder.3.weight"], sd["binary_decoder.3.bias"] = torch.zeros(1, 128), torch.zeros(1)
    sd["gene_embedding_layer.0.weight"], sd["gene_embedding_layer.0.bias"] = torch.zeros(d_model, token_dim), torch.zeros(d_model)
    sd["gene_embedding_layer.2.weight"], sd["gene_embedding_layer.2.bias"] = torch.ones(d_model), torch.zeros(d_model)
    sd["pe_embedding.weight"] = rnd(4 + N_GENES + N_CHROM, token_dim)
    sd["pe_embedding.weight"][0] = 0  # PAD
    return {k: v.float().cpu() for k, v in sd.items()}


def sentences(n: int, seed: int = 1) -> dict:
    """[CLS, (chrom, genes..., CLOSE) x C]: 1 + 1024 + 2C tokens, C in 20..25 (lengths 1,065-1,075)."""
    rng = np.random.default_rng(seed)
    out, lengths = [], []
    for _ in range(n):
        c = int(rng.integers(20, 26))
        genes = np.sort(rng.integers(4, 4 + N_GENES, 1024))
        parts = [np.array([3])]
        for chunk, chrom in zip(np.array_split(genes, c), rng.permutation(N_CHROM)[:c]):
            parts += [np.array([4 + N_GENES + chrom]), chunk, np.array([2])]
        s = np.concatenate(parts).astype(np.uint32)
        out.append(s)
        lengths.append(len(s))
    return {"tokens": np.concatenate(out), "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "cell_index": np.arange(n)}


def subset(s: dict, n: int) -> dict:
    return {"tokens": s["tokens"][: s["offsets"][n]], "offsets": s["offsets"][: n + 1], "cell_index": s["cell_index"][:n]}


def species_file(sd: dict, cfg: dict) -> dict:
    vocab = np.arange(sd["pe_embedding.weight"].shape[0])
    return {"vocab": torch.from_numpy(vocab), "projected": project_tokens(sd, sd["pe_embedding.weight"], vocab),
            "model": {"file": "synthetic", "config": {"d_model": cfg["d_model"], "token_dim": cfg["token_dim"]}}}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def reference_embed(sd: dict, cfg: dict, nlayers: int, s: dict, device, batch_size: int = 25) -> tuple[np.ndarray, float]:
    """The reference forward as its eval loop runs it: consecutive batches, float ids truncated to
    the batch maximum, table lookup, L2 normalise, TransformerModel.forward with the float mask."""
    TransformerModel = reference_model_class()
    m = TransformerModel(token_dim=cfg["token_dim"], d_model=cfg["d_model"], nhead=cfg["nhead"], d_hid=cfg["d_hid"],
                         nlayers=nlayers, dropout=0.05, output_dim=cfg["output_dim"])
    m.pe_embedding = torch.nn.Embedding.from_pretrained(torch.zeros_like(sd["pe_embedding.weight"]))
    m.load_state_dict(sd, strict=True)
    m.pe_embedding = torch.nn.Embedding.from_pretrained(sd["pe_embedding.weight"])
    m = m.eval().to(device)
    lengths = np.diff(s["offsets"])
    n, embeds = len(lengths), []

    def run(lo, hi):
        L = int(lengths[lo:hi].max())
        ids, mask = torch.zeros(hi - lo, L), torch.zeros(hi - lo, L)
        for j, r in enumerate(range(lo, hi)):
            t = torch.from_numpy(s["tokens"][s["offsets"][r]:s["offsets"][r + 1]].astype(np.int64))
            ids[j, :len(t)], mask[j, :len(t)] = t.float(), 1
        x = F.normalize(m.pe_embedding(ids.permute(1, 0).long().to(device)), dim=2)
        return m.forward(x, mask=mask.to(device))[1].cpu().numpy()

    run(0, min(batch_size, n))  # warm-up: CUDA context, kernel choice
    sync(device)
    t0 = time.perf_counter()
    for b in range(0, n, batch_size):
        embeds.append(run(b, min(b + batch_size, n)))
    sync(device)
    return np.vstack(embeds), time.perf_counter() - t0


def ours(sd: dict, sf: dict, s: dict, device, compat: bool, precision: str, batch_size=None) -> tuple[np.ndarray, float, dict]:
    emb = Embedder(sd, sf, EmbedSettings(compat, batch_size, precision, device.type), sf.get("nhead"))
    emb.embed(subset(s, min(32, len(s["offsets"]) - 1)))  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out = emb.embed(s)
    sync(device)
    dt = time.perf_counter() - t0
    info = {"oom_splits": emb.oom_splits}
    if device.type == "cuda":
        from uce_nf.embed import token_budget
        info["token_budget"] = token_budget(emb.cfg, emb.device, emb.dtype)
        info["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out, dt, info


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def forced_oom(sd, sf, s, device) -> dict:
    """OOM on the first batch: a memory cap on GPU, a simulated CUDA OOM on CPU; back-off must change nothing."""
    n = min(len(s["offsets"]) - 1, 512)
    part = subset(s, n)
    base, _, _ = ours(sd, sf, part, device, False, "fp32")
    L = int(np.diff(part["offsets"]).max())
    if device.type == "cuda":  # the budget is sized from free memory, so a 1 GiB cap on top makes it fail
        torch.cuda.empty_cache()
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 2**30) / total))
    else:
        os.environ[SIMULATE_ENV] = str(2 * L)
    try:
        got, dt, info = ours(sd, sf, part, device, False, "fp32")
    finally:
        os.environ.pop(SIMULATE_ENV, None)
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    return {"cells": n, "oom_splits": info["oom_splits"], "max_abs_diff_vs_no_oom": float(np.abs(got - base).max())}


def two_claims() -> dict:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s) visible"}
    code = ("import os,sys,time; sys.path.insert(0, sys.argv[2]); from uce_nf.devices import claim_device; "
            "d = claim_device(lock_dir=sys.argv[1]); print(d.uuid, flush=True); time.sleep(3)")
    locks = Path(os.environ.get("TMPDIR", "/tmp")) / f"uce-gpu-check-{os.getpid()}"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(locks), str(ROOT / "src")], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    got = [p.stdout.readline().strip() for p in procs]
    for p in procs:
        p.wait()
    return {"claimed": got, "distinct": len(set(got)) == 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: proves the script end to end")
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    ap.add_argument("--layers", default="4,33")
    ap.add_argument("--cells", type=int, default=None, help="cells for our runs (default 8192 on GPU, 64 smoke)")
    ap.add_argument("--ref-cells", type=int, default=None, help="cells for the reference and fp32 runs")
    a = ap.parse_args()
    smoke = a.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    cfg = dict(SMOKE if smoke else REAL)
    n = a.cells or (64 if smoke else 8192)
    n_ref = a.ref_cells or (48 if smoke else 400)
    s_all = sentences(n)
    s_ref = subset(s_all, n_ref)
    res = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                       "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
                       "smoke": smoke}, "models": {}}
    t_start = time.time()
    for nlayers in [int(x) for x in a.layers.split(",")] if not smoke else [1, 2]:
        sd = checkpoint(nlayers, device=device, **cfg)
        sf = species_file(sd, cfg)
        sf["nhead"] = cfg["nhead"]
        ref, t_ref = reference_embed(sd, cfg, nlayers, s_ref, device)
        compat, t_compat, _ = ours(sd, sf, s_ref, device, True, "fp32", 25)
        fp32, t_fp32, i32 = ours(sd, sf, s_ref, device, False, "fp32")
        bf16, t_bf16, i16 = ours(sd, sf, s_all, device, False, "bf16")
        r = {"reference_fp32_cells_per_s": n_ref / t_ref, "compat_fp32_cells_per_s": n_ref / t_compat,
             "default_fp32_cells_per_s": n_ref / t_fp32, "default_bf16_cells_per_s": n / t_bf16,
             "compat_vs_reference_min_cosine": cosine(compat, ref), "bf16_vs_fp32_min_cosine": cosine(bf16[:n_ref], fp32),
             "fp32_default_vs_reference_min_cosine": cosine(fp32, ref), "bf16": i16, "fp32": i32,
             "speedup_bf16_vs_reference": (n / t_bf16) / (n_ref / t_ref)}
        res["models"][f"{nlayers}-layer"] = r
        print(f"{nlayers}-layer: " + json.dumps(r), flush=True)
        del sd, sf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sd = checkpoint(1 if smoke else 4, device=device, **cfg)
    sf = species_file(sd, cfg)
    sf["nhead"] = cfg["nhead"]
    res["oom_back_off"] = forced_oom(sd, sf, s_all, device)
    res["two_claims"] = two_claims()
    res["seconds"] = time.time() - t_start
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_check.json").write_text(json.dumps(res, indent=1) + "\n")
    (a.out / "gpu_check.md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Device check on {m['device']} (torch {m['torch']}, CUDA {m['cuda']}){' — CPU smoke run, numbers meaningless' if m['smoke'] else ''}.", "",
             "| model | reference fp32 cells/s | compat fp32 | default fp32 | default bf16 | bf16 / reference | compat vs ref min cos | bf16 vs fp32 min cos | token budget | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        lines.append(f"| {name} | {r['reference_fp32_cells_per_s']:.1f} | {r['compat_fp32_cells_per_s']:.1f} | "
                     f"{r['default_fp32_cells_per_s']:.1f} | {r['default_bf16_cells_per_s']:.1f} | "
                     f"{r['speedup_bf16_vs_reference']:.2f}x | {r['compat_vs_reference_min_cosine']:.7f} | "
                     f"{r['bf16_vs_fp32_min_cosine']:.5f} | {r['bf16'].get('token_budget', '-')} | {r['bf16'].get('peak_gpu_gb', '-')} |")
    o = res["oom_back_off"]
    lines += ["", f"Forced OOM back-off: {o['oom_splits']} split(s) over {o['cells']} cells, max abs difference to the run "
              f"without OOM {o['max_abs_diff_vs_no_oom']:.2e}. Two claims: {res['two_claims']}. Total {res['seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
