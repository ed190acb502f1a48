"""Runs the reference implementation (uce-model 0.1.4, import name `uce`) as a test oracle.

The reference runs on its own defaults: its arguments come from its own parser
(`uce.eval_single_anndata.parser`) given only what a user would type (`user_argv`), never values
that our code computed. Preprocessing and index generation are the reference's AnndataProcessor
itself; the token table comes from its get_ESM2_embeddings; sentences from its
MultiDatasetSentences + MultiDatasetSentenceCollator in a DataLoader (one numpy stream, cell order).

Two departures from `run_eval`, both forced and neither touching a value of the computation:
- `np.random.seed(seed)` right before the batch loop: the reference is unseeded, and this is what
  makes it reproducible (uce-reference.md §15).
- run_eval hard-codes d_model 1280, nhead 20 and a 145,469 x 5,120 placeholder table. Our test
  checkpoints are small, so the model is built with the checkpoint's d_model (nhead = d_model / 64,
  the official head width) and a placeholder of the checkpoint table's shape. The layer count and
  widths come from the parsed arguments, as in run_eval. Test-only code.
"""

from __future__ import annotations

import json
import os
import pickle
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch


def reference_args(h5ad: Path, model_dir: Path, workdir: Path, *, species: str = "human", batch_size: int = 25,
                   model: str = "4layer_model.torch", filter_: bool = True, user_argv=()) -> Namespace:
    """The reference's parser on a user's command line: the official model_files layout in model_dir,
    output in workdir, plus `user_argv` (e.g. ["--nlayers", "4", "--CHROM_TOKEN_OFFSET", "6304"])."""
    from uce.eval_single_anndata import parser
    model_dir = Path(model_dir)
    argv = ["--adata_path", str(h5ad), "--dir", str(workdir) + "/", "--species", species,
            "--model_loc", str(model_dir / model), "--batch_size", str(batch_size),
            "--spec_chrom_csv_path", str(model_dir / "species_chrom.csv"),
            "--token_file", str(model_dir / "all_tokens.torch"),
            "--protein_embeddings_dir", str(model_dir / "protein_embeddings") + "/",
            "--offset_pkl_path", str(model_dir / "species_offsets.pkl")]
    if not filter_:
        argv += ["--filter", ""]  # type=bool: only the empty string is False (uce-reference.md §12)
    return parser.parse_args([*argv, *map(str, user_argv)])


def model_argv(info: dict) -> list[str]:
    """What a user of a non-default model passes: its layer count and widths (fixture facts)."""
    return ["--nlayers", info["nlayers"], "--token_dim", info["token_dim"], "--d_hid", info["d_hid"],
            "--output_dim", info["output_dim"]]


def demo_user_argv(model_dir: Path) -> list:
    """What a user of `uce make-demo` files passes: the model widths and, when the token file replaces
    the table, the CHROM_TOKEN_OFFSET it was built with (facts recorded in ../demo_info.json)."""
    info = json.loads((Path(model_dir).parent / "demo_info.json").read_text())["model_files"]
    extra = [] if info["full_table"] else ["--CHROM_TOKEN_OFFSET", info["chrom_token_offset"]]
    return model_argv(info) + extra


class _workdir:
    """chdir into the reference's work folder: its gene_embeddings module reads
    ./model_files/protein_embeddings (hard-coded), so that path must exist there."""

    def __init__(self, args: Namespace):
        self.dir = Path(args.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        link = self.dir / "model_files" / "protein_embeddings"
        if not link.exists():
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(Path(args.protein_embeddings_dir).resolve())

    def __enter__(self):
        self.cwd = os.getcwd()
        os.chdir(self.dir)

    def __exit__(self, *exc):
        os.chdir(self.cwd)


def reference_prepare(args: Namespace):
    """AnndataProcessor's preprocess_anndata + generate_idxs (no accelerator: single process).
    Returns the processor (its .name, .adata and the index file paths)."""
    from uce.evaluate import AnndataProcessor
    with _workdir(args):
        proc = AnndataProcessor(args, None)
        proc.preprocess_anndata()
        proc.generate_idxs()
    return proc


def reference_dataset(args: Namespace, name: str):
    """MultiDatasetSentences over the files AnndataProcessor left in args.dir for dataset `name`."""
    from uce.eval_data import MultiDatasetSentences
    out = args.dir
    with open(out + f"{name}_shapes_dict.pkl", "rb") as f:
        shapes = pickle.load(f)
    return MultiDatasetSentences(sorted_dataset_names=[name], shapes_dict=shapes, args=args, npzs_dir=out,
                                 dataset_to_protein_embeddings_path=out + f"{name}_pe_idx.torch",
                                 datasets_to_chroms_path=out + f"{name}_chroms.pkl",
                                 datasets_to_starts_path=out + f"{name}_starts.pkl")


def reference_model(args: Namespace):
    """run_eval's model set-up: strict load into a zero placeholder table, then the token file
    replaces the table unless get_ESM2_embeddings gives the official 145,469 rows."""
    from torch import nn
    from uce.evaluate import get_ESM2_embeddings
    from uce.model import TransformerModel
    sd = torch.load(args.model_loc, map_location="cpu")
    d_model = sd["encoder.0.weight"].shape[0]
    model = TransformerModel(token_dim=args.token_dim, d_model=d_model, nhead=max(1, d_model // 64), d_hid=args.d_hid,
                             nlayers=args.nlayers, dropout=0.05, output_dim=args.output_dim)
    model.pe_embedding = nn.Embedding.from_pretrained(torch.zeros_like(sd["pe_embedding.weight"]))
    model.load_state_dict(sd, strict=True)
    all_pe = get_ESM2_embeddings(args)
    if all_pe.shape[0] != 145469:
        model.pe_embedding = nn.Embedding.from_pretrained(all_pe)
    return model.eval()


def run_reference(args: Namespace, seed: int = 0) -> dict:
    """The whole flow; returns {'obs_names', 'var_names', 'sentences' (token arrays), 'embeddings'}."""
    from torch import nn
    from torch.utils.data import DataLoader
    from uce.eval_data import MultiDatasetSentenceCollator

    proc = reference_prepare(args)
    with _workdir(args):
        dataset = reference_dataset(args, proc.name)
        model = reference_model(args)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
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
    return {"obs_names": np.asarray(proc.adata.obs_names), "var_names": np.asarray(proc.adata.var_names),
            "sentences": sentences, "embeddings": np.vstack(embeds)}
