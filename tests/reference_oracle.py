"""Runs the reference implementation (uce-model 0.1.4, import name `uce`) as a test oracle.

It drives the reference's own functions and classes the way its eval_single_anndata/run_eval does:
process_raw_anndata, get_species_to_pe/get_spec_chrom_csv/adata_path_to_prot_chrom_starts,
MultiDatasetSentences + MultiDatasetSentenceCollator in a DataLoader (one numpy stream, cell order),
and its TransformerModel in fp32. The only addition is `np.random.seed(seed)` right before the batch
loop, which is what makes the reference reproducible (uce-reference.md §15). Test-only code.
"""

from __future__ import annotations

import os
import pickle
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def reference_workdir(h5ad: Path, model_dir: Path, workdir: Path) -> tuple[str, str]:
    """Lay out `workdir` as the reference expects (it reads ./model_files/protein_embeddings, hard-coded)
    with a copy of the input under data/; returns (dataset name, output prefix)."""
    workdir = Path(workdir)
    (workdir / "model_files").mkdir(parents=True, exist_ok=True)
    link = workdir / "model_files" / "protein_embeddings"
    if not link.exists():
        link.symlink_to(Path(model_dir).resolve() / "protein_embeddings")
    (workdir / "data").mkdir(exist_ok=True)
    shutil.copyfile(h5ad, workdir / "data" / Path(h5ad).name)
    return Path(h5ad).name.removesuffix(".h5ad"), str(workdir) + "/"


def reference_preprocess(h5ad: Path, workdir: Path, species: str, filter_: bool = True):
    """process_raw_anndata (filters, gene subset, dense int64 counts memmap); run inside workdir."""
    from uce.data_proc.data_utils import process_raw_anndata
    row = pd.Series(dtype=object)
    row.path, row.covar_col, row.species = Path(h5ad).name, np.nan, species
    out = str(workdir) + "/"
    return process_raw_anndata(row, out, out, "", False, filter_, root=str(Path(workdir) / "data"))


def reference_index(adata, name: str, out: str, model_dir: Path, species: str) -> int:
    """generate_idxs: token ids, chromosome codes, starts files; returns the chromosome category count."""
    from uce.data_proc.data_utils import adata_path_to_prot_chrom_starts, get_spec_chrom_csv, get_species_to_pe
    species_to_pe = get_species_to_pe(str(Path(model_dir) / "protein_embeddings"))
    with open(Path(model_dir) / "species_offsets.pkl", "rb") as f:
        offsets = pickle.load(f)
    chroms_csv = get_spec_chrom_csv(str(Path(model_dir) / "species_chrom.csv"))
    pe_idx, chroms, starts = adata_path_to_prot_chrom_starts(adata, species, list(species_to_pe[species].keys()),
                                                             chroms_csv, offsets[species])
    torch.save({name: pe_idx}, out + f"{name}_pe_idx.torch")
    with open(out + f"{name}_chroms.pkl", "wb") as f:
        pickle.dump({name: chroms}, f)
    with open(out + f"{name}_starts.pkl", "wb") as f:
        pickle.dump({name: starts}, f)
    return len(chroms_csv["spec_chrom"].cat.categories)


def run_reference(h5ad: Path, model_dir: Path, workdir: Path, *, species="human", seed=0, batch_size=25,
                  model="4layer_model.torch", filter_=True) -> dict:
    """Returns {'obs_names', 'var_names', 'sentences' (list of token arrays), 'embeddings'}."""
    from torch import nn
    from torch.utils.data import DataLoader
    from uce.eval_data import MultiDatasetSentenceCollator, MultiDatasetSentences
    from uce.model import TransformerModel

    name, out = reference_workdir(h5ad, model_dir, workdir)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        adata, n_cells, n_genes = reference_preprocess(h5ad, workdir, species, filter_)
        shapes = {name: (n_cells, n_genes)}
        n_cat = reference_index(adata, name, out, model_dir, species)

        sd = torch.load(Path(model_dir) / model, map_location="cpu")
        table = sd["pe_embedding.weight"]
        d_model, token_dim = sd["encoder.0.weight"].shape
        nlayers = len({k.split(".")[2] for k in sd if k.startswith("transformer_encoder.layers.")})
        args = Namespace(pad_length=1536, sample_size=1024, cls_token_idx=3, chrom_token_right_idx=2,
                         pad_token_idx=0, CHROM_TOKEN_OFFSET=table.shape[0] - n_cat, token_dim=token_dim)
        model = TransformerModel(token_dim=token_dim, d_model=d_model, nhead=max(1, d_model // 64),
                                 d_hid=sd["transformer_encoder.layers.0.linear1.weight"].shape[0], nlayers=nlayers,
                                 output_dim=sd["decoder.3.weight"].shape[0], dropout=0.05)
        model.pe_embedding = nn.Embedding.from_pretrained(torch.zeros_like(table))
        model.load_state_dict(sd, strict=True)
        model.eval()

        dataset = MultiDatasetSentences(sorted_dataset_names=[name], shapes_dict=shapes, args=args, npzs_dir=out,
                                        dataset_to_protein_embeddings_path=out + f"{name}_pe_idx.torch",
                                        datasets_to_chroms_path=out + f"{name}_chroms.pkl",
                                        datasets_to_starts_path=out + f"{name}_starts.pkl")
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                            collate_fn=MultiDatasetSentenceCollator(args), num_workers=0)
        np.random.seed(seed)
        embeds, sentences = [], []
        with torch.no_grad():
            for batch_sentences, mask, _idxs, _cs in loader:
                for s, m in zip(batch_sentences, mask):
                    sentences.append(s[: int(m.sum())].long().numpy())
                x = model.pe_embedding(batch_sentences.permute(1, 0).long())
                x = nn.functional.normalize(x, dim=2)
                _, emb = model.forward(x, mask=mask)
                embeds.append(emb.numpy())
        return {"obs_names": np.asarray(adata.obs_names), "var_names": np.asarray(adata.var_names),
                "sentences": sentences, "embeddings": np.vstack(embeds)}
    finally:
        os.chdir(cwd)
