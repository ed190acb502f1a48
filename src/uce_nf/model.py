"""The UCE transformer for inference (uce-reference.md §8), batch-first.

Token projection (normalize -> Linear -> GELU -> LayerNorm -> * sqrt(d)) is precomputed per species
(species.py), so the model starts from projected token vectors. Layers are post-LN
nn.TransformerEncoderLayer equivalents with a ReLU FFN. Only the CLS position is needed at the end:
the last layer computes attention and FFN for the CLS query only, and the decoder runs on CLS only.

Attention bias per key, [B, 1, 1, L]:
- compat (`reference`): +1.0 on PAD keys, 0 elsewhere. The reference passes `1 - mask` as a *float*
  key_padding_mask, which PyTorch adds to the logits (§8.5); kept for fidelity.
- default: -inf on PAD keys, so a cell's embedding depends on its own tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model_files import ModelConfig


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nhead = cfg.nhead
        self.in_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_hid)
        self.linear2 = nn.Linear(cfg.d_hid, cfg.d_model)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        B, L, D = x.shape  # batch, sequence length, d_model
        H = self.nhead
        q, k, v = self.in_proj(x).split(D, dim=2)  # each [B, L, D]
        if cls_only:  # only the CLS query matters after the last layer
            x, q = x[:, :1], q[:, :1]
        q = q.reshape(B, -1, H, D // H).transpose(1, 2)  # [B, H, Lq, hd]
        k = k.reshape(B, L, H, D // H).transpose(1, 2)  # [B, H, L, hd]
        v = v.reshape(B, L, H, D // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, H, Lq, hd]
        y = y.transpose(1, 2).reshape(B, -1, D)
        x = self.norm1(x + self.out_proj(y))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class UCE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("pe", torch.zeros(cfg.max_len, cfg.d_model))  # sinusoidal, from the checkpoint
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.nlayers))
        dims = [cfg.d_model, 1024, cfg.output_dim, cfg.output_dim]
        self.decoder = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.LayerNorm(b), nn.GELU())
                                     for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(cfg.output_dim, cfg.output_dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: projected tokens [B, L, D]; bias: [B, 1, 1, L] additive, or None (no padding).
        Returns unit embeddings [B, out]."""
        x = x + self.pe[: x.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block(x, bias, cls_only=i == len(self.blocks) - 1)
        h = x[:, 0].float()  # CLS  [B, D]
        with torch.autocast(x.device.type, enabled=False):  # one position per cell: fp32 here costs nothing
            for layer in self.decoder:
                h = layer(h)
            return F.normalize(self.head(h), dim=1)

    @classmethod
    def from_checkpoint(cls, sd: dict, cfg: ModelConfig) -> "UCE":
        """Map the reference state dict onto this module (strict: every needed key must be present).
        Built on the meta device and the weights assigned, not copied: no random init of parameters that
        are overwritten anyway (a minute for 33 layers on a loaded 2-core machine), and weights from a
        memory-mapped species file are read when first used."""
        with torch.device("meta"):
            model = cls(cfg)
        mine = {"pe": sd["pos_encoder.pe"][:, 0, :]}
        for i in range(cfg.nlayers):
            p = f"transformer_encoder.layers.{i}."
            for ours, theirs in [("in_proj.weight", "self_attn.in_proj_weight"), ("in_proj.bias", "self_attn.in_proj_bias"),
                                 ("out_proj.weight", "self_attn.out_proj.weight"), ("out_proj.bias", "self_attn.out_proj.bias"),
                                 *[(f"{n}.{t}", f"{n}.{t}") for n in ("linear1", "linear2", "norm1", "norm2")
                                   for t in ("weight", "bias")]]:
                mine[f"blocks.{i}.{ours}"] = sd[p + theirs]
        for j in range(3):
            for t in ("weight", "bias"):
                mine[f"decoder.{j}.0.{t}"] = sd[f"decoder.{j}.0.{t}"]
                mine[f"decoder.{j}.1.{t}"] = sd[f"decoder.{j}.1.{t}"]
        mine["head.weight"], mine["head.bias"] = sd["decoder.3.weight"], sd["decoder.3.bias"]
        model.load_state_dict({k: v.float().contiguous() for k, v in mine.items()}, strict=True, assign=True)
        return model.eval()
