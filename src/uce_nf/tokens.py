"""Gene -> token indexing (uce-reference.md §5): for each processed gene its token id (upper-cased
symbol's position in the species vocabulary + species offset), global chromosome code and start."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import UserError, save_npz


def index_genes(symbols, species_file: dict) -> dict[str, np.ndarray]:
    vocab = {s: i for i, s in enumerate(species_file["symbols"])}
    pos = np.array([vocab.get(str(s).upper(), -1) for s in symbols], dtype=np.int64)
    bad = [str(s) for s, p in zip(symbols, pos) if p < 0]
    if bad:
        raise UserError(f"{len(bad)} genes have no token in the {species_file['species']} vocabulary "
                        f"(e.g. {', '.join(bad[:5])}); the processed file does not belong to this species file")
    in_csv = species_file["in_chrom_csv"].numpy()[pos]
    if not in_csv.all():
        raise UserError(f"{int((~in_csv).sum())} genes lack a chromosome position; re-run preprocess with this species file")
    return {
        "token_id": species_file["token_ids"].numpy()[pos],
        # the reference argsorts codes in pandas' Categorical code dtype; keep that dtype
        "chrom": species_file["chrom_codes"].numpy()[pos].astype(species_file["chrom_code_dtype"]),
        "start": species_file["starts"].numpy()[pos],
        "chrom_token_offset": np.int64(species_file["chrom_token_offset"]),
    }


def save_index(index: dict, path: Path) -> None:
    save_npz(path, **index)


def load_index(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
