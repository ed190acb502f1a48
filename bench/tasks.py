"""Benchmark tasks, each run in its own subprocess by bench/run_bench.py (so peak RSS is per task):

    python bench/tasks.py TASK '{"json": "arguments"}'

prints one line `RESULT {json}` with the timed section's seconds and cells. Timings cover the work
only (imports and model loading are excluded and reported apart where they matter); the reference
pieces are driven exactly as tests/reference_oracle.py drives them (uce-model 0.1.4).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))


def _cpu() -> float:
    """CPU seconds of this process and of its waited-for children (pool workers)."""
    import resource
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _ref_args(h5ad: str, model_dir: str, workdir: str, species: str = "human", batch_size: int = 25):
    """The reference's own parser, given what a user of these (make-demo) files would pass."""
    from reference_oracle import demo_user_argv, reference_args
    return reference_args(Path(h5ad), Path(model_dir), Path(workdir), species=species, batch_size=batch_size,
                          user_argv=demo_user_argv(Path(model_dir)))


def ref_prepare(h5ad: str, model_dir: str, workdir: str, species: str = "human") -> dict:
    """The reference's preprocessing + index generation (AnndataProcessor: process_raw_anndata, dense
    int64 memmap, generate_idxs), as eval_single_anndata runs them; leaves the files the reference's
    dataset reads in `workdir`."""
    from reference_oracle import reference_prepare
    args = _ref_args(h5ad, model_dir, workdir, species)
    t0 = time.perf_counter()
    proc = reference_prepare(args)
    n_cells, n_genes = proc.adata.shape
    (Path(workdir) / "meta.json").write_text(json.dumps({"name": proc.name, "n_cells": n_cells, "n_genes": n_genes,
                                                         "h5ad": h5ad, "species": species}))
    # AnndataProcessor runs both steps back to back; index generation is the short one (§15)
    return {"cells": int(n_cells), "genes": int(n_genes), "seconds_prepare": time.perf_counter() - t0}


def ref_sentences(workdir: str, model_dir: str, n_cells: int, seed: int = 0, save: str | None = None) -> dict:
    """The reference sampler: MultiDatasetSentences.__getitem__ (dense int64 memmap row -> torch
    log1p weights -> np.random.choice -> chromosome grouping/shuffle) for the first n_cells, in
    cell order from one np.random.seed(seed) stream, as its DataLoader (num_workers=0) does."""
    from reference_oracle import reference_dataset
    os.chdir(workdir)
    meta = json.loads((Path(workdir) / "meta.json").read_text())
    ds = reference_dataset(_ref_args(meta["h5ad"], model_dir, workdir, meta["species"]), meta["name"])
    n = min(n_cells, meta["n_cells"])
    np.random.seed(seed)
    items = []
    t0, c0 = time.perf_counter(), _cpu()
    for i in range(n):
        items.append(ds[i])
    dt, cpu = time.perf_counter() - t0, _cpu() - c0
    if save:
        sents = [it[0][0, : int(it[3])].long().numpy().astype(np.uint32) for it in items]
        lengths = np.array([len(s) for s in sents])
        np.savez(save, tokens=np.concatenate(sents), offsets=np.concatenate([[0], np.cumsum(lengths)]))
    return {"cells": n, "genes": int(meta["n_genes"]), "seconds": dt, "task_cpu_s": cpu, "cells_per_s": n / dt}


def our_sentences(adata: str, index: str, out_dir: str, compat: bool, workers: int, seed: int = 0,
                  shard_size: int = 100_000, batch_size: int = 25) -> dict:
    from uce_nf.sentences import write_sentences
    from uce_nf.tokens import load_index
    import h5py
    with h5py.File(adata, "r") as f:
        n = int(f["X"].attrs["shape"][0])
        n_genes = int(f["X"].attrs["shape"][1])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    idx = load_index(Path(index))
    t0, c0 = time.perf_counter(), _cpu()
    paths = write_sentences(Path(adata), idx, Path(out_dir), "bench", seed=seed, compat=compat, batch_size=batch_size,
                            shard_size=shard_size, workers=workers)
    dt, cpu = time.perf_counter() - t0, _cpu() - c0
    return {"cells": n, "genes": n_genes, "seconds": dt, "task_cpu_s": cpu, "cells_per_s": n / dt, "shards": [str(p) for p in paths]}


def _subset(s: dict, n: int) -> dict:
    """The first n cells; when n exceeds the shard, its cells again in order (for GPU-sized runs)."""
    have = len(s["offsets"]) - 1
    if n <= have:
        return {"tokens": s["tokens"][: s["offsets"][n]], "offsets": s["offsets"][: n + 1], "cell_index": s["cell_index"][:n]}
    rows = np.arange(n) % have
    lengths = np.diff(s["offsets"])[rows]
    tokens = np.concatenate([s["tokens"][s["offsets"][r]:s["offsets"][r + 1]] for r in rows])
    return {"tokens": tokens, "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(s["offsets"].dtype),
            "cell_index": np.arange(n)}


def _reset_gpu_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _gpu_stats(device: str) -> dict:
    """Peak GPU memory of the timed section (the RSS numbers say nothing about the GPU)."""
    if not device.startswith("cuda"):
        return {}
    torch.cuda.synchronize()
    return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "gpu": torch.cuda.get_device_name()}


def _reference_model_class():
    from reference_model import reference_model_class
    return reference_model_class()


def ref_forward(model_dir: str, sentences: str, n_cells: int, batch_size: int, model: str = "4layer_model.torch",
                save: str | None = None, threads: int | None = None, device: str = "cpu") -> dict:
    """The reference forward as eval_single_anndata runs it: float32 token/mask batches of consecutive
    cells truncated to the batch maximum, pe_embedding lookup, L2 normalise, TransformerModel.forward
    (fp32, eval, no_grad), CLS of the decoder output."""
    from torch import nn

    from uce_nf.sentences import load_sentences
    TransformerModel = _reference_model_class()
    if threads:
        torch.set_num_threads(threads)
    sd = torch.load(Path(model_dir) / model, map_location="cpu")
    table = sd["pe_embedding.weight"]
    d_model, token_dim = sd["encoder.0.weight"].shape
    nlayers = len({k.split(".")[2] for k in sd if k.startswith("transformer_encoder.layers.")})
    m = TransformerModel(token_dim=token_dim, d_model=d_model, nhead=max(1, d_model // 64),
                         d_hid=sd["transformer_encoder.layers.0.linear1.weight"].shape[0], nlayers=nlayers,
                         output_dim=sd["decoder.3.weight"].shape[0], dropout=0.05)
    m.pe_embedding = nn.Embedding.from_pretrained(torch.zeros_like(table))
    m.load_state_dict(sd, strict=True)
    m.eval().to(device)
    s = _subset(load_sentences(Path(sentences)), n_cells)
    n = len(s["offsets"]) - 1
    lengths = np.diff(s["offsets"])
    embeds = []
    if device != "cpu":  # the first GPU batch pays for the CUDA context and kernel selection: run it untimed
        _ref_batches(m, s, lengths, min(batch_size, n), batch_size, device, [])
        _reset_gpu_peak(device)
    t0, c0 = time.perf_counter(), _cpu()
    _ref_batches(m, s, lengths, n, batch_size, device, embeds)
    dt, cpu = time.perf_counter() - t0, _cpu() - c0
    if save:
        np.save(save, np.vstack(embeds))
    return {"cells": n, "seconds": dt, "task_cpu_s": cpu, "cells_per_s": n / dt, "mean_length": float(lengths.mean()),
            "threads": torch.get_num_threads(), **_gpu_stats(device)}


def _ref_batches(m, s: dict, lengths: np.ndarray, n: int, batch_size: int, device: str, embeds: list) -> None:
    """The first n cells through the reference model in consecutive batches; CLS embeddings into `embeds`."""
    from torch import nn
    with torch.no_grad():
        for b in range(0, n, batch_size):
            rows = range(b, min(b + batch_size, n))
            L = int(lengths[b:min(b + batch_size, n)].max())
            bs = torch.zeros((len(rows), L))
            mask = torch.zeros((len(rows), L))
            for j, r in enumerate(rows):  # the collator: float32 ids and masks, truncated to the batch max
                tok = torch.from_numpy(s["tokens"][s["offsets"][r]:s["offsets"][r + 1]].astype(np.int64))
                bs[j, : len(tok)] = tok.float()
                mask[j, : len(tok)] = 1
            x = m.pe_embedding(bs.permute(1, 0).long().to(device))
            x = nn.functional.normalize(x, dim=2)
            _, emb = m.forward(x, mask=mask.to(device))
            embeds.append(emb.cpu().numpy())


def our_forward(model_dir: str, species_file: str, sentences: str, n_cells: int, batch_size: int, compat: bool,
                precision: str = "fp32", model: str = "4layer_model.torch", save: str | None = None,
                threads: int | None = None, compile: bool = False, device: str = "cpu") -> dict:
    from uce_nf.embed import EmbedSettings, Embedder
    from uce_nf.sentences import load_sentences
    from uce_nf.species import load_species
    if threads:
        torch.set_num_threads(threads)
    sd = torch.load(Path(model_dir) / model, map_location="cpu", mmap=True)
    emb = Embedder(sd, load_species(Path(species_file)), EmbedSettings(compat, batch_size, precision, device, compile))
    s = _subset(load_sentences(Path(sentences)), n_cells)
    n = len(s["offsets"]) - 1
    if device != "cpu":  # untimed warm-up batch, as for the reference
        emb.embed(_subset(s, min(batch_size, n)))
        _reset_gpu_peak(device)
    t0, c0 = time.perf_counter(), _cpu()
    out = emb.embed(s)
    dt, cpu = time.perf_counter() - t0, _cpu() - c0
    if save:
        np.save(save, out)
    return {"cells": n, "seconds": dt, "task_cpu_s": cpu, "cells_per_s": n / dt, "mean_length": float(np.diff(s["offsets"]).mean()),
            "threads": torch.get_num_threads(), **_gpu_stats(device)}


def ref_e2e(h5ad: str, model_dir: str, workdir: str, seed: int = 0, batch_size: int = 25, save: str | None = None) -> dict:
    """The whole reference flow (eval_single_anndata equivalent, seeded once): tests/reference_oracle.py."""
    from reference_oracle import run_reference
    args = _ref_args(h5ad, model_dir, workdir, batch_size=batch_size)
    t0, c0 = time.perf_counter(), _cpu()
    r = run_reference(args, seed)
    dt, cpu = time.perf_counter() - t0, _cpu() - c0
    if save:
        np.savez(save, embeddings=r["embeddings"], obs_names=r["obs_names"].astype(str))
    n = len(r["embeddings"])
    return {"cells": n, "seconds": dt, "task_cpu_s": cpu, "cells_per_s": n / dt}


TASKS = {f.__name__: f for f in (ref_prepare, ref_sentences, our_sentences, ref_forward, our_forward, ref_e2e)}

if __name__ == "__main__":
    import warnings
    warnings.filterwarnings("ignore")
    result = TASKS[sys.argv[1]](**json.loads(sys.argv[2]))
    print("RESULT " + json.dumps(result), flush=True)
