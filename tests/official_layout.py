"""Model files in the official shapes, built unlike our own assumptions (a parity fixture).

From the demo's protein embeddings and checkpoint weights, it writes what a user of the official
files has:
- all_tokens.torch with exactly 143,574 rows and a checkpoint whose table has 145,469 rows, so the
  reference keeps the checkpoint's table and its default CHROM_TOKEN_OFFSET 143574 applies;
- species_chrom.csv with far fewer chromosome categories (~65) than the table has chromosome rows
  (1,895): deriving the offset as `rows - categories` shifts every chromosome token;
- species blocks in a non-alphabetical order (species_offsets.pkl says where each one starts);
- csv genes without a protein embedding, on a scaffold of their own, and the csv rows shuffled;
- the demo's case collision (CD74 / Cd74) in the human embeddings.
Token width stays 32 (the reference takes it from --token_dim), so the files are ~40 MB, not 6 GB.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

TOKEN_ROWS, TABLE_ROWS = 143_574, 145_469  # all_tokens.torch; checkpoint pe_embedding (uce-reference §3.3)
BLOCK_ORDER = ["mouse", "zebrafish", "human", "pig", "frog", "macaca_mulatta", "mouse_lemur", "macaca_fascicularis"]


def write_official_layout(src: Path, dest: Path, checkpoint: str = "4layer_model.torch", seed: int = 5) -> dict:
    """Build dest/ from the demo model files in src/; returns the facts a user would know
    (model widths for the reference's --nlayers/--token_dim/... and the species offsets)."""
    src, dest = Path(src), Path(dest)
    shutil.copytree(src / "protein_embeddings", dest / "protein_embeddings")
    g = torch.Generator().manual_seed(seed)
    sd = torch.load(src / checkpoint, map_location="cpu")
    token_dim = sd["encoder.0.weight"].shape[1]

    rows = [torch.zeros(1, token_dim), torch.randn(3, token_dim, generator=g)]
    offsets, n = {}, 4
    for species in BLOCK_ORDER:
        pe_file = next(p for p in (dest / "protein_embeddings").glob("*.pt") if _species_of(p) == species)
        upper: dict[str, torch.Tensor] = {}
        for k, v in torch.load(pe_file).items():
            upper[k.upper()] = v  # position of the first key, value of the last (reference §3.3)
        offsets[species] = n
        rows.append(torch.stack(list(upper.values())))
        n += len(upper)
    rows.append(torch.randn(TOKEN_ROWS - n, token_dim, generator=g))  # unused filler up to the official size
    tokens = torch.cat(rows).contiguous()
    torch.save(tokens, dest / "all_tokens.torch")
    sd["pe_embedding.weight"] = torch.cat([tokens, torch.randn(TABLE_ROWS - TOKEN_ROWS, token_dim, generator=g)])
    torch.save(sd, dest / checkpoint)
    with open(dest / "species_offsets.pkl", "wb") as f:
        pickle.dump(offsets, f)

    csv = pd.read_csv(src / "species_chrom.csv", dtype={"chromosome": str})
    extra = pd.DataFrame({"species": "human", "gene_symbol": [f"NOEMB{i}" for i in range(40)],
                          "chromosome": ["KI270728.1"] * 20 + ["1"] * 20, "start": np.arange(40) * 1000 + 17})
    csv = pd.concat([csv, extra]).sample(frac=1.0, random_state=seed)
    csv.to_csv(dest / "species_chrom.csv", index=False)
    n_cat = (csv["species"] + "_" + csv["chromosome"]).nunique()
    assert n_cat < TABLE_ROWS - TOKEN_ROWS
    d_model = sd["encoder.0.weight"].shape[0]
    info = {"nlayers": 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer_encoder.layers.")),
            "token_dim": token_dim, "d_hid": sd["transformer_encoder.layers.0.linear1.weight"].shape[0],
            "output_dim": sd["decoder.3.weight"].shape[0], "d_model": d_model, "species_offsets": offsets,
            "n_chrom_categories": int(n_cat)}
    (dest / "layout_info.json").write_text(json.dumps(info, indent=1))
    return info


def _species_of(path: Path) -> str:
    prefix = {"Homo": "human", "Mus": "mouse", "Xenopus": "frog", "Danio": "zebrafish", "Microcebus": "mouse_lemur",
              "Sus": "pig", "Macaca_fascicularis": "macaca_fascicularis", "Macaca_mulatta": "macaca_mulatta"}
    for k, v in prefix.items():
        if path.name.startswith(k):
            return v
    raise ValueError(path)


def tie_tokens(model_dir: Path, species: str = "human") -> list[set[int]]:
    """Token ids of distinct genes that share (chromosome, start): their order in a sentence comes from
    numpy's unstable argsort (uce-reference.md §15), so parity reports such cells apart."""
    csv = pd.read_csv(Path(model_dir) / "species_chrom.csv", dtype={"chromosome": str})
    csv = csv[csv["species"] == species]
    pe_file = next(p for p in (Path(model_dir) / "protein_embeddings").glob("*.pt") if _species_of(p) == species)
    keys = list(dict.fromkeys(k.upper() for k in torch.load(pe_file)))
    with open(Path(model_dir) / "species_offsets.pkl", "rb") as f:
        first = pickle.load(f)[species]
    pos = {k: first + i for i, k in enumerate(keys)}
    groups = []
    for _, grp in csv.groupby(["chromosome", "start"]):
        ids = {pos[s.upper()] for s in grp["gene_symbol"] if s.upper() in pos}
        if len(ids) > 1:
            groups.append(ids)
    return groups
