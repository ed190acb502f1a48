"""Embedding one shard of sentences with the model (uce-reference.md §7-8).

compat (`reference`): consecutive batches of batch_size cells, padded to the batch's longest
sentence, +1 float pad bias, fp32 — the reference's exact arithmetic layout.
default: cells sorted by length into batches (no padding waste to speak of), PAD keys masked with
-inf, so the result does not depend on batch size or neighbours; bf16 autocast on GPU.
The next batch is prepared on a worker thread in pinned memory while the GPU runs this one.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .io import Progress, UserError
from .model import UCE
from .model_files import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class EmbedSettings:
    compat: bool = False
    batch_size: int = 25  # 0: as large as free GPU memory allows (default mode only)
    precision: str = "auto"  # auto | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        log.warning("--device cuda requested but no CUDA device is visible; falling back to CPU")
        return torch.device("cpu")
    return torch.device(name)


def pick_dtype(precision: str, device: torch.device, compat: bool) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if (device.type == "cuda" and not compat) else torch.float32
    if precision == "bf16" and compat:
        log.warning("bf16 with compat=reference: results will no longer match the reference bit for bit")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def auto_batch_size(cfg: ModelConfig, length: int, device: torch.device, dtype: torch.dtype) -> int:
    """Cells per batch that fit in ~60% of free GPU memory: per layer a cell holds x, qkv, attention
    output and the FFN hidden state; flash/memory-efficient SDPA keeps no L x L matrix."""
    if device.type != "cuda":
        return 64
    free, _ = torch.cuda.mem_get_info(device)
    bytes_per = torch.finfo(dtype).bits // 8
    per_cell = length * (6 * cfg.d_model + cfg.d_hid) * bytes_per * 2 + length * cfg.d_model * 4
    return int(max(1, min(4096, 0.6 * free // per_cell)))


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
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as the reference
            torch.backends.cudnn.allow_tf32 = False
        self.forward = torch.compile(self.model) if settings.compile else self.model

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
            if bs <= 0:
                raise UserError("--batch-size must be > 0 with compat=reference: the batch defines the result")
            return [np.arange(s, min(s + bs, n)) for s in range(0, n, bs)]
        if bs <= 0:
            bs = auto_batch_size(self.cfg, int(lengths.max(initial=1)), self.device, self.dtype)
            log.info("automatic batch size: %d cells", bs)
        order = np.argsort(lengths, kind="stable")  # similar lengths together: padding waste ~0
        return [order[s:s + bs] for s in range(0, n, bs)]

    def _prepare(self, sentences: dict, rows: np.ndarray):
        offsets, tokens = sentences["offsets"], sentences["tokens"]
        lengths = offsets[rows + 1] - offsets[rows]
        L = int(lengths.max())
        ids = np.zeros((len(rows), L), dtype=np.int64)  # PAD row 0 of the table is token 0
        pad_local = self._local(np.array([0], dtype=np.uint32))[0]
        ids[:] = pad_local
        for j, r in enumerate(rows):
            ids[j, :lengths[j]] = self._local(tokens[offsets[r]:offsets[r + 1]])
        pad = np.arange(L)[None, :] >= lengths[:, None]  # [B, L]
        bias = np.where(pad, 1.0 if self.settings.compat else -math.inf, 0.0).astype(np.float32)
        ids_t, bias_t = torch.from_numpy(ids), torch.from_numpy(bias)
        if self.device.type == "cuda":
            ids_t, bias_t = ids_t.pin_memory(), bias_t.pin_memory()
        return ids_t, bias_t

    @torch.no_grad()
    def embed(self, sentences: dict) -> np.ndarray:
        n = len(sentences["offsets"]) - 1
        out = np.zeros((n, self.cfg.output_dim), dtype=np.float32)
        batches = self.batches(sentences)
        progress = Progress(n, "embed")
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)
        with ThreadPoolExecutor(1) as prep:
            nxt = prep.submit(self._prepare, sentences, batches[0]) if batches else None
            for i, rows in enumerate(batches):
                ids, bias = nxt.result()
                if i + 1 < len(batches):
                    nxt = prep.submit(self._prepare, sentences, batches[i + 1])
                ids = ids.to(self.device, non_blocking=True)
                bias = bias.to(self.device, non_blocking=True)[:, None, None, :]  # [B, 1, 1, L]
                with autocast:
                    emb = self.forward(self.table[ids], bias)  # autocast casts the bias with q, k, v
                out[rows] = emb.float().cpu().numpy()
                progress.update(len(rows))
        progress.close()
        if not np.isfinite(out).all():
            raise RuntimeError(f"{int((~np.isfinite(out).all(axis=1)).sum())} cells got non-finite embeddings; "
                               "try --precision fp32")
        return out
