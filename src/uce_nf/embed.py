"""Embedding shards of sentences with the model (uce-reference.md §7-8), each on its own.

compat (`reference`): consecutive batches of batch_size cells, padded to the batch's longest
sentence, +1 float pad bias, fp32 — the reference's exact arithmetic layout.
default: cells grouped by exact sentence length (real lengths span ~10 values), so a batch has no
padding and no mask, and SDPA can take its flash kernel; the result depends on the cell alone, so
any batch size gives the same embedding. Batches fill a token budget (cells x length) sized from
free GPU memory. Out of memory, a batch is split in halves and retried (accelerate's
find_executable_batch_size); in compat mode the batch defines the result, so OOM is a one-line
error with the largest batch size that fits. The next batch is prepared on a worker thread in
pinned memory while the device runs this one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .devices import pick_device
from .io import Progress, UserError, save_npz
from .model import UCE
from .model_files import ModelConfig
from .sentences import load_sentences

log = logging.getLogger(__name__)
CPU_TOKEN_BUDGET = 64 * 1100  # ~64 real sentences: large enough for BLAS, small enough for the cache
SIMULATE_ENV = "UCE_NF_SIMULATE_GPU_TOKENS"  # tests/device check: batches above N tokens raise a CUDA OOM


@dataclass
class EmbedSettings:
    compat: bool = False
    batch_size: int | None = None  # compat: cells per batch (None: the reference's 25); default: a cap, None/0: none
    precision: str = "auto"  # auto | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False


def pick_dtype(precision: str, device: torch.device, compat: bool) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if (device.type == "cuda" and not compat) else torch.float32
    if precision == "bf16" and compat:
        log.warning("bf16 with compat=reference: results will no longer match the reference bit for bit")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def token_budget(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Tokens (cells x length) per batch that fit in ~60% of free GPU memory. Per token a layer holds
    x, q/k/v, the attention output and the FFN hidden state (flash/memory-efficient SDPA keeps no
    L x L matrix), about twice over for temporaries, plus the fp32 gathered input."""
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    per_token = (6 * cfg.d_model + cfg.d_hid) * (torch.finfo(dtype).bits // 8) * 2 + cfg.d_model * 4
    return int(max(2048, 0.6 * free // per_token))


def is_oom(e: BaseException) -> bool:
    from accelerate.utils.memory import should_reduce_batch_size
    return isinstance(e, torch.OutOfMemoryError) or should_reduce_batch_size(e)


class Embedder:
    def __init__(self, sd: dict, species_file: dict, settings: EmbedSettings, nhead: int | None = None):
        self.settings = settings
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.precision, self.device, settings.compat)
        self.cfg = ModelConfig.from_state_dict(sd, nhead)
        want = species_file["model"]["config"]
        if {k: want[k] for k in ("d_model", "token_dim")} != {"d_model": self.cfg.d_model, "token_dim": self.cfg.token_dim}:
            raise UserError(f"the species file was prepared for model {species_file['model']['file']} "
                            f"(d_model {want['d_model']}), not this checkpoint (d_model {self.cfg.d_model}); "
                            "re-run prepare-species with the same --model")
        self.model = UCE.from_checkpoint(sd, self.cfg).to(self.device)
        self.vocab = species_file["vocab"].numpy()
        self.table = species_file["projected"].to(self.device)  # [V, D] fp32
        self.pad_local = int(self._local(np.array([0], dtype=np.uint32))[0])
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as the reference
            torch.backends.cudnn.allow_tf32 = False
        self.forward = torch.compile(self.model) if settings.compile else self.model
        self.simulated_tokens = int(os.environ.get(SIMULATE_ENV, "0") or 0)
        self.max_cells = None  # lowered after an out-of-memory split (default mode)
        self.oom_splits = 0

    def device_info(self) -> dict:
        """What uns['uce'] and the report record: the device, and for a GPU its name and uuid."""
        info = {"device": str(self.device)}
        if self.device.type == "cuda":
            info["gpu_name"] = torch.cuda.get_device_name(self.device)
            info["gpu_visible_as"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0")
        return info

    def _local(self, tokens: np.ndarray) -> np.ndarray:
        local = np.searchsorted(self.vocab, tokens)
        if (local >= len(self.vocab)).any() or (self.vocab[np.minimum(local, len(self.vocab) - 1)] != tokens).any():
            raise UserError("sentences contain tokens outside this species file: sentences and species file "
                            "come from different species or models")
        return local.astype(np.int64)

    def batches(self, sentences: dict) -> list[np.ndarray]:
        """Lists of row numbers within the shard, one per forward batch."""
        offsets = sentences["offsets"]
        n = len(offsets) - 1
        lengths = np.diff(offsets)
        bs = self.settings.batch_size
        if self.settings.compat:
            bs = 25 if bs is None else bs
            if bs <= 0:
                raise UserError("--batch-size 0 (auto) works only with --compat none: in compat mode the batch "
                                "defines the result; pass the reference's batch size, e.g. 25")
            return [np.arange(s, min(s + bs, n)) for s in range(0, n, bs)]
        budget = token_budget(self.cfg, self.device, self.dtype)
        order = np.argsort(lengths, kind="stable")
        out = []
        for length in np.unique(lengths):  # equal lengths: no padding, no mask
            rows = order[lengths[order] == length]
            per = max(1, budget // max(int(length), 1))
            if bs:
                per = min(per, bs)
            out += [rows[s:s + per] for s in range(0, len(rows), per)]
        log.info("%d batches of equal-length sentences (token budget %d%s)", len(out), budget,
                 f", at most {bs} cells" if bs else "")
        return out

    def _prepare(self, sentences: dict, rows: np.ndarray):
        """Token rows [B, L] in the species file's local ids, and the pad bias [B, L] (None: no padding)."""
        offsets, tokens = sentences["offsets"], sentences["tokens"]
        starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
        L = int(lengths.max())
        pos = np.arange(L)[None, :]
        pad = pos >= lengths[:, None]  # [B, L]
        ids = self._local(tokens[np.where(pad, 0, starts[:, None] + pos)])  # one gather, no per-row Python
        ids[pad] = self.pad_local
        ids_t = torch.from_numpy(ids)
        bias_t = None
        if self.settings.compat or pad.any():
            bias_t = torch.from_numpy(np.where(pad, 1.0 if self.settings.compat else -math.inf, 0.0).astype(np.float32))
        if self.device.type == "cuda":
            ids_t = ids_t.pin_memory()
            bias_t = bias_t.pin_memory() if bias_t is not None else None
        return ids_t, bias_t

    def _run(self, ids: torch.Tensor, bias: torch.Tensor | None) -> np.ndarray:
        if self.simulated_tokens and ids.numel() > self.simulated_tokens:
            raise torch.OutOfMemoryError(f"CUDA out of memory. (simulated: {ids.numel()} tokens > "
                                         f"{SIMULATE_ENV}={self.simulated_tokens})")
        ids = ids.to(self.device, non_blocking=True)
        if bias is not None:
            bias = bias.to(self.device, non_blocking=True)[:, None, None, :]  # [B, 1, 1, L]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            emb = self.forward(self.table[ids], bias)  # autocast casts the bias with q, k, v
        return emb.float().cpu().numpy()

    def _split_run(self, sentences: dict, rows: np.ndarray) -> np.ndarray:
        """Default mode after an OOM: halves of the batch until they fit; later batches keep that size."""
        from accelerate.utils import find_executable_batch_size
        size = max(1, len(rows) // 2)

        def halve():
            nonlocal size
            size //= 2
            return size

        @find_executable_batch_size(starting_batch_size=size, reduce_batch_size_fn=halve)
        def run(batch_size):
            return np.concatenate([self._run(*self._prepare(sentences, rows[s:s + batch_size]))
                                   for s in range(0, len(rows), batch_size)])

        out = run()
        self.max_cells = size
        self.oom_splits += 1
        log.warning("out of memory at %d cells x %d tokens: split into batches of %d cells", len(rows),
                    int(np.diff(sentences["offsets"])[rows].max()), size)
        return out

    def _largest_fitting(self, sentences: dict, rows: np.ndarray) -> int:
        size = len(rows)
        while size > 1:
            size //= 2
            try:
                self._run(*self._prepare(sentences, rows[:size]))
                return size
            except Exception as e:
                if not is_oom(e):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return 0

    def _embed_batch(self, sentences: dict, rows: np.ndarray, prepared) -> np.ndarray:
        if self.max_cells and len(rows) > self.max_cells:
            return np.concatenate([self._embed_batch(sentences, rows[s:s + self.max_cells], None)
                                   for s in range(0, len(rows), self.max_cells)])
        try:
            return self._run(*(prepared or self._prepare(sentences, rows)))
        except Exception as e:
            if not is_oom(e):
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.settings.compat:
            fits = self._largest_fitting(sentences, rows)
            raise UserError(f"out of memory at --batch-size {len(rows)} (compat mode: the batch defines the result, "
                            f"so it is never split); " + (f"the largest batch that fits this device is {fits}: pass "
                            f"--batch_size {fits}" if fits else "not even one cell fits: use a larger GPU"))
        return self._split_run(sentences, rows)

    @torch.no_grad()
    def embed(self, sentences: dict) -> np.ndarray:
        # Each shard as in a task of its own (EMBED packs several datasets' shards into one task):
        # no batch cap or split count carried over, the GPU cache released before its budget is sized.
        self.max_cells, self.oom_splits = None, 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        n = len(sentences["offsets"]) - 1
        out = np.zeros((n, self.cfg.output_dim), dtype=np.float32)
        batches = self.batches(sentences)
        progress = Progress(n, "embed")
        with ThreadPoolExecutor(1) as prep:
            nxt = prep.submit(self._prepare, sentences, batches[0]) if batches else None
            for i, rows in enumerate(batches):
                prepared = nxt.result()
                if i + 1 < len(batches):
                    nxt = prep.submit(self._prepare, sentences, batches[i + 1])
                out[rows] = self._embed_batch(sentences, rows, prepared)
                progress.update(len(rows))
        progress.close()
        if not np.isfinite(out).all():
            raise RuntimeError(f"{int((~np.isfinite(out).all(axis=1)).sum())} cells got non-finite embeddings; "
                               "try --precision fp32")
        return out

    def embed_files(self, sentences_paths, outputs) -> None:
        """One embeddings file per sentences file (a pack of shards shares this model)."""
        for sentences_path, output in zip(sentences_paths, outputs):
            s = load_sentences(sentences_path)
            t0 = time.time()
            out = self.embed(s)
            save_npz(output, embeddings=out, cell_index=s["cell_index"], precision=str(self.dtype).replace("torch.", ""),
                     seconds=time.time() - t0, oom_splits=self.oom_splits, **self.device_info())
            log.info("wrote %s (%d cells)", output, len(out))
