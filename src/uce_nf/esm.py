"""Per-protein ESM2 embeddings: the mean of the last layer's representations over the residues.

What is computed is fair-esm's `extract.py --include mean --truncate` (the UCE/SATURN recipe): each
sequence truncated to its first 1,022 residues, wrapped in BOS (<cls>) and EOS (<eos>), one token per
residue (unknown letters -> <unk>), and the final-layer output (after the last layer norm) averaged
over the residue positions only, BOS/EOS and padding excluded.

The loader is a local Hugging Face `EsmModel` folder (config.json, weights, vocab.txt), through
`transformers`, not a fair-esm `.pt`, because:
- fair-esm (last release 2022) unpickles its `.pt` with `torch.load`'s defaults, which torch >= 2.6
  (weights_only) refuses for the ESM2 .pt files (e.g. bytedance/Protenix issue 176), and it needs the
  contact-regression file next to the weights;
- transformers loads the sharded safetensors/bin weights straight into bf16 on the GPU (30 GB for
  esm2_t48_15B_UR50D instead of a 60 GB fp32 copy in host memory first) and is maintained;
- its ESM port is the same network (rotary positions, token-dropout scaling, final layer norm).
Tokens are mapped from the folder's vocab.txt here, one per character, as fair-esm's alphabet does,
so no tokenizer version can change the ids.

Batches are length-sorted (longest first, so an out-of-memory shows at once) and hold at most
`token_budget` padded positions; an OOM halves the batch and retries. bf16 on GPU, fp32 on CPU; the
mean is always accumulated in fp32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from .io import Progress, UserError, atomic_path, load_tagged
from .proteome import MAX_RESIDUES, read_proteins

log = logging.getLogger(__name__)
FORMAT = "uce-nf/esm-embeddings/1"
SPECIALS = ("<cls>", "<pad>", "<eos>", "<unk>")
TOKEN_BUDGET = {"cpu": 4096, "cuda": 32768}  # padded positions per batch; the 15B model in bf16 keeps ~150 kB/token


def model_identity(model_dir: Path) -> dict:
    """What a saved output must match to be reused: the model folder's config (hash) and sizes."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise UserError(f"--esm-model {model_dir}: a file; pass a Hugging Face EsmModel folder (config.json, weights, "
                        "vocab.txt), e.g. facebook/esm2_t48_15B_UR50D fetched with `hf download` (a fair-esm .pt is "
                        "not read)")
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise UserError(f"--esm-model {model_dir}: no config.json; pass a Hugging Face EsmModel folder "
                        "(config.json, weights, vocab.txt)")
    raw = cfg_path.read_bytes()
    cfg = json.loads(raw)
    if cfg.get("model_type") != "esm":
        raise UserError(f"{cfg_path}: model_type '{cfg.get('model_type')}', not 'esm'; pass an ESM2 model folder")
    return {"name": model_dir.name, "config_sha256": hashlib.sha256(raw).hexdigest(),
            "hidden_size": int(cfg["hidden_size"]), "num_hidden_layers": int(cfg["num_hidden_layers"])}


def read_vocab(model_dir: Path) -> dict[str, int]:
    path = Path(model_dir) / "vocab.txt"
    if not path.exists():
        raise UserError(f"{path}: missing; the ESM model folder needs its vocab.txt (save the tokenizer with it)")
    vocab = {tok.strip(): i for i, tok in enumerate(path.read_text().splitlines())}
    missing = [t for t in SPECIALS if t not in vocab]
    if missing:
        raise UserError(f"{path}: not an ESM vocabulary (no {', '.join(missing)}); use the model's own vocab.txt")
    return vocab


def checkpoint_token_dim(checkpoint: Path) -> int:
    from .model_files import _load
    sd = _load(Path(checkpoint))  # memory-mapped: only a shape is read
    if not isinstance(sd, dict) or "encoder.0.weight" not in sd:
        raise UserError(f"{checkpoint}: not a UCE checkpoint (no 'encoder.0.weight'); pass the .torch model file")
    return int(sd["encoder.0.weight"].shape[1])


def check_width(width: int, checkpoint: Path | None, what: str) -> None:
    if checkpoint is None:
        return
    token_dim = checkpoint_token_dim(checkpoint)
    if width != token_dim:
        raise UserError(f"{what}: width {width} does not match the token_dim {token_dim} of {checkpoint}; the official "
                        "UCE checkpoints need esm2_t48_15B_UR50D (5,120 dims)")


def encode(sequence: str, vocab: dict[str, int]) -> list[int]:
    unk = vocab["<unk>"]
    return [vocab["<cls>"], *(vocab.get(c, unk) for c in sequence[:MAX_RESIDUES]), vocab["<eos>"]]


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype):
    from transformers import EsmModel
    kw = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    model = EsmModel.from_pretrained(model_dir, dtype=dtype, add_pooling_layer=False, local_files_only=True,
                                     attn_implementation="sdpa", **kw)
    return model.to(device).eval()


def batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices, longest first, grouped so that batch size x its longest length <= budget (a sequence
    longer than the budget goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.no_grad()
def mean_representations(model, ids: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[n, hidden] fp32: per sequence, the mean of last_hidden_state over positions 1..len-2."""
    n, width = len(ids), max(len(x) for x in ids)
    tokens = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for k, x in enumerate(ids):
        tokens[k, :len(x)] = torch.tensor(x)
        mask[k, :len(x)] = 1
    residues = mask.clone()
    residues[:, 0] = 0
    residues[torch.arange(n), torch.tensor([len(x) - 1 for x in ids])] = 0  # EOS
    out = model(input_ids=tokens.to(device), attention_mask=mask.to(device)).last_hidden_state
    r = residues.to(device).unsqueeze(-1).float()
    return ((out.float() * r).sum(1) / r.sum(1)).cpu()


def embed_proteins(model, vocab: dict[str, int], sequences: list[str], device: torch.device, budget: int) -> tuple[torch.Tensor, int]:
    """Embeddings in input order, and how many times an OOM split a batch."""
    from .embed import is_oom
    ids = [encode(s, vocab) for s in sequences]
    result = torch.empty((len(ids), model.config.hidden_size), dtype=torch.float32)
    splits = 0
    progress = Progress(len(ids), "esm-embed", unit="proteins")
    pending = batches([len(x) for x in ids], budget)
    while pending:
        batch = pending.pop(0)
        try:
            result[batch] = mean_representations(model, [ids[i] for i in batch], vocab["<pad>"], device)
        except Exception as e:
            if not is_oom(e) or len(batch) == 1:
                if is_oom(e):
                    raise UserError(f"out of GPU memory on one protein of {len(ids[batch[0]]) - 2} residues; use a "
                                    "GPU with more memory") from None
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(batch) // 2
            pending[:0] = [batch[:half], batch[half:]]
            splits += 1
            continue
        progress.update(len(batch))
    progress.close()
    return result, splits


def proteins_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_embeddings(path: Path) -> dict:
    return load_tagged(path, FORMAT, "an embeddings file", "uce esm-embed")


def existing_output(output: Path, sha: str, ident: dict) -> bool:
    """A finished output for these proteins and this model is kept (resume); anything else is redone."""
    if not output.exists():
        return False
    try:
        obj = load_embeddings(output)
    except UserError:
        return False
    return (obj.get("proteins_sha256") == sha and obj.get("model", {}).get("config_sha256") == ident["config_sha256"]
            and obj["embeddings"].shape == (len(obj["protein_ids"]), ident["hidden_size"]))


def esm_embed(proteins: Path, model_dir: Path, output: Path, device: str = "auto", precision: str = "auto",
              token_budget: int | None = None, checkpoint: Path | None = None, gpu_lock_dir: Path | None = None,
              gpu_wait: float = 0.0) -> dict:
    from .devices import claim_device, pick_device
    ident = model_identity(model_dir)
    check_width(ident["hidden_size"], checkpoint, f"--esm-model {model_dir}")
    vocab = read_vocab(model_dir)
    sha = proteins_sha256(proteins)
    if existing_output(output, sha, ident):
        log.info("%s: already done for these proteins and this model; kept", output)
        return {"kept": True}
    df = read_proteins(proteins)
    if device != "cpu":
        claim_device(gpu_lock_dir, wait_s=gpu_wait)  # one free GPU of this node, before torch touches CUDA
    dev = pick_device(device)
    dtype = torch.bfloat16 if (precision == "bf16" or (precision == "auto" and dev.type == "cuda")) else torch.float32
    t0 = time.time()
    model = load_model(model_dir, dev, dtype)
    log.info("ESM model %s (%d layers, %d dims) on %s in %s, loaded in %.1f s", ident["name"], ident["num_hidden_layers"],
             ident["hidden_size"], dev, str(dtype).replace("torch.", ""), time.time() - t0)
    t1 = time.time()
    emb, splits = embed_proteins(model, vocab, list(df["sequence"]), dev, token_budget or TOKEN_BUDGET[dev.type])
    seconds = time.time() - t1
    obj = {"format": FORMAT, "protein_ids": list(df["protein_id"]), "embeddings": emb, "proteins_sha256": sha,
           "model": ident, "dtype": str(dtype).replace("torch.", ""), "device": str(dev), "max_residues": MAX_RESIDUES,
           "seconds": seconds, "oom_splits": splits}
    with atomic_path(output) as tmp:
        torch.save(obj, tmp)
    log.info("embedded %d proteins in %.1f s (%.2f proteins/s); wrote %s", len(df), seconds, len(df) / max(seconds, 1e-9), output)
    return {"kept": False, "proteins": len(df), "seconds": seconds}
