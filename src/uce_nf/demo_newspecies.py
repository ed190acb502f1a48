"""The new-species demo (assets/demo/new_species/, issue 13): a small Ensembl-format peptide FASTA, a
randomly initialised ESM2 saved as a Hugging Face EsmModel folder, a species sheet and a dataset of
the species, all made offline and seeded, so `-profile test,new_species` runs from a clean clone.

    python scripts/make_new_species_demo.py [--dest assets/demo/new_species]

The FASTA has what real ones have: isoforms of one gene, a sequence with a stop codon ('*'), a
zebrafish-style symbol with a colon, `primary_assembly:` next to `chromosome:` locations, a
protein longer than 1,022 residues (truncated by ESM2), a header without gene_symbol.
The ESM2 has the demo checkpoint's token_dim (32) as hidden size: the random weights stand in for
esm2_t48_15B_UR50D (5,120 dims) exactly as the demo checkpoint stands in for the official ones.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

SPECIES, TAXONOMY_ID = "demofish", 7955
FASTA_NAME = "Demo_fishus.DemoAsm1.pep.all.fa.gz"
AMINO = "ACDEFGHIKLMNPQRSTVWY"
# fair-esm's / Hugging Face's ESM2 alphabet, in id order (33 tokens)
ESM_VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
N_GENES, N_CELLS = 150, 90


def _header(pid: str, symbol: str | None, chrom: str, start: int, kind: str = "chromosome") -> str:
    sym = f" gene_symbol:{symbol}" if symbol else ""
    return (f">{pid} pep {kind}:DemoAsm1:{chrom}:{start}:{start + 999}:1 gene:ENSDARG{pid} transcript:ENSDART{pid} "
            f"gene_biotype:protein_coding transcript_biotype:protein_coding{sym} description:demo protein "
            "[Source:ZFIN;Acc:ZDB-GENE-0]")


def fasta_records(seed: int = 13) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)

    def seq(n: int) -> str:
        return "M" + "".join(rng.choice(list(AMINO), n - 1))

    recs = []
    for g in range(1, N_GENES + 1):
        chrom, kind = (["1", "2", "3", "X"][g % 4], "chromosome") if g % 10 else (f"KN1500{g:02d}.1", "primary_assembly")
        recs.append((_header(f"{g:05d}01", f"dfg{g:03d}", chrom, 10_000 * g, kind), seq(int(rng.integers(40, 160)))))
    recs.append((_header("0000102", "dfg001", "2", 5_000), seq(90)))  # isoforms of dfg001
    recs.append((_header("0000103", "dfg001", "2", 7_000), seq(130)))
    recs.append((_header("0099901", "si:ch211-1a2.3", "5", 8_000), seq(100)))  # ':' in the symbol
    recs.append((_header("0099902", "LONGG1", "5", 9_000), seq(1_200)))  # > 1,022 residues
    recs.append((_header("0099903", "stopg1", "1", 1_000), seq(60) + "*" + seq(10)))  # dropped
    recs.append((_header("0099904", None, "1", 2_000), seq(50)))  # no gene_symbol: dropped
    return recs


def write_fasta(path: Path, records: list[tuple[str, str]]) -> None:
    # mtime=0: the same bytes on every machine
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for h, s in records:
            f.write((h + "\n" + "\n".join(s[i:i + 60] for i in range(0, len(s), 60)) + "\n").encode())


def write_esm_model(dest: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """A 2-layer ESM2 with random weights, saved as a real EsmModel folder (config, safetensors, vocab)."""
    import torch
    from transformers import EsmConfig, EsmModel
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.txt").write_text("\n".join(ESM_VOCAB) + "\n")
    torch.manual_seed(seed)
    cfg = EsmConfig(vocab_size=len(ESM_VOCAB), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=2 * hidden_size, max_position_embeddings=1026, position_embedding_type="rotary",
                    token_dropout=True, emb_layer_norm_before=False, pad_token_id=1, mask_token_id=32, layer_norm_eps=1e-5)
    EsmModel(cfg, add_pooling_layer=False).save_pretrained(dest)
    for f in dest.iterdir():  # safetensors are written 0600; the assets are read by containers too
        f.chmod(0o644)
    return dest


def write_dataset(path: Path, symbols: list[str], seed: int = 3) -> None:
    """Counts of N_CELLS cells over the species' genes (var names = the FASTA's symbols) plus a few
    genes the species does not have; two groups of cells with different expression."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    rng = np.random.default_rng(seed)
    genes = list(symbols) + ["notagene1", "notagene2"]
    rate = np.where(np.arange(N_CELLS)[:, None] < N_CELLS // 2, 1.0, 3.0) * rng.uniform(0.5, 3.0, len(genes))[None, :]
    X = sp.csr_matrix(rng.poisson(rate).astype(np.float32))
    obs = pd.DataFrame({"group": ["a" if i < N_CELLS // 2 else "b" for i in range(N_CELLS)]},
                       index=[f"fishcell{i:03d}" for i in range(N_CELLS)])
    ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path, compression="gzip")


def write_new_species_demo(dest: Path) -> dict:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    recs = fasta_records()
    write_fasta(dest / FASTA_NAME, recs)
    write_esm_model(dest / "esm2_tiny")
    symbols = list(dict.fromkeys(h.split("gene_symbol:")[1].split()[0] for h, s in recs
                                 if "gene_symbol:" in h and "*" not in s))
    write_dataset(dest / "fish_demo.h5ad", symbols)
    (dest / "species_sheet.csv").write_text(f"species,fasta,taxonomy_id\n{SPECIES},{FASTA_NAME},{TAXONOMY_ID}\n")
    (dest / "samplesheet.csv").write_text("sample,h5ad,species\npbmc_demo,../pbmc_demo.h5ad,human\n"
                                          f"fish_demo,fish_demo.h5ad,{SPECIES}\n")
    return {"species": SPECIES, "genes": len(symbols), "cells": N_CELLS}
