"""The small per-sample summary that `uce report` reads instead of the final h5ad (issue 12).

MERGE writes it next to the result (``uce merge --summary <id>.summary.json``), so the REPORT task
of a run with hundreds of datasets stages kilobytes to a few megabytes per dataset, not the
embeddings:

``<id>.summary.json``  name, file, cells, dims, ``uns['uce']`` provenance, the obs column kinds,
                       the embedding QC numbers (norms over every cell, mean pairwise cosine of
                       the seeded cosine sample), and the ``species`` block: scalars of the species
                       file MERGE read (vocabulary size, chromosomes, chromosome token offset and
                       how it was found, gene token ids, checkpoint, origin; report_species.py).
                       Without the block (older summaries, or straight from an h5ad) the report
                       says "not recorded";
``<id>.summary.npz``   for the seeded map sample (up to 20,000 cells): the top 50 principal
                       components of their embeddings and the explained-variance ratios (the PCA
                       map is the first two, the UMAP map is fitted on all 50, as before), and the
                       values of every categorical, boolean, numeric and string obs column at
                       those cells (any of them can be a --color-by column later).

The report computed straight from an h5ad (``uce report --adata``) goes through the same two
steps in memory, so both routes give the same page. Choices that depend on report options (the
collapse threshold, the colour columns) are applied when the report is built, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .io import UserError, atomic_path

try:
    from anndata.io import read_elem
except ImportError:  # pragma: no cover
    from anndata.experimental import read_elem

FORMAT = "uce-nf report summary 1"
PCS = 50


def _arrays_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.name.removesuffix(".json") + ".npz")


def _column(f: h5py.File, col: str, kind: str, rows: np.ndarray) -> pd.Series | None:
    """obs[col] at `rows` (sorted). Categorical, bool and numeric columns are read whole (codes
    and numbers: a few bytes per cell); strings only at the rows."""
    node = f["obs"][col]
    if kind == "string" and isinstance(node, h5py.Dataset):
        return pd.Series(node.asstr()[rows] if len(rows) else np.array([], dtype=object), dtype=object)
    if kind not in ("categorical", "numeric"):
        return None
    v = read_elem(node)
    s = pd.Series(v) if isinstance(v, (pd.Categorical, pd.Series, pd.Index)) else pd.Series(np.asarray(v))
    return s.iloc[rows].reset_index(drop=True)


def _encode(name: str, s: pd.Series, i: int, arrays: dict) -> dict:
    """One obs column into npz arrays (no pickled objects): numbers as float64 (NaN for NA),
    everything else as int32 codes (-1 for NA) into a unicode category array."""
    numeric = (pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
               and not isinstance(s.dtype, pd.CategoricalDtype))
    if numeric:
        arrays[f"col{i}_values"] = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        return {"name": name, "encoding": "numeric"}
    if isinstance(s.dtype, pd.CategoricalDtype):
        codes, cats = s.cat.codes.to_numpy(), s.cat.categories
    else:
        codes, cats = pd.factorize(s, use_na_sentinel=True)
    arrays[f"col{i}_codes"] = np.asarray(codes, dtype=np.int32)
    arrays[f"col{i}_categories"] = np.asarray([str(c) for c in cats], dtype=str)
    return {"name": name, "encoding": "categorical", "bool": bool(pd.api.types.is_bool_dtype(s))}


def _decode(meta: dict, i: int, z) -> pd.Series:
    if meta["encoding"] == "numeric":
        return pd.Series(z[f"col{i}_values"])
    cats = [str(c) for c in z[f"col{i}_categories"]]
    if meta.get("bool"):  # back to bool, as the h5ad gives it (NA-free: h5ad bools have no NA)
        return pd.Series(np.asarray(cats, dtype=object)[z[f"col{i}_codes"]] == "True")
    return pd.Series(pd.Categorical.from_codes(z[f"col{i}_codes"], categories=pd.Index(cats, dtype=object)))


def summarise(path: Path, *, seed: int, map_cells: int) -> tuple[dict, np.ndarray, np.ndarray, dict]:
    """(numbers, map PCs, explained-variance ratios, {obs column: values at the map cells})."""
    from .report import obs_kinds, scan_sample
    from .report_map import pca
    from .report import SUFFIX
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: not a readable h5ad file ({str(e).splitlines()[0]}); "
                        f"pass the final <sample>{SUFFIX} written by `uce merge`") from None
    with f:
        info, picked, map_rows = scan_sample(f, path, seed=seed, map_cells=map_cells)
        kinds = obs_kinds(f)
        columns = {}
        for c, k in kinds.items():
            s = _column(f, c, k, map_rows)
            if s is not None:
                columns[c] = s
    info["obs_kinds"] = kinds
    pcs, ratio = pca(picked, PCS)
    return info, pcs, ratio, columns


def write_summary(h5ad: Path, json_path: Path, *, seed: int = 0, map_cells: int | None = None,
                  species: dict | None = None) -> Path:
    """<id>.summary.json + <id>.summary.npz of a final h5ad (written atomically). `species`: the species
    block (report_species.species_block of the species file MERGE read), kept as is."""
    from .report import MAP_CELLS
    info, pcs, ratio, columns = summarise(Path(h5ad), seed=seed, map_cells=map_cells or MAP_CELLS)
    if species is not None:
        info["species"] = species
    arrays = {"pcs": pcs.astype(np.float32), "ratio": np.asarray(ratio, dtype=np.float64)}
    info["columns"] = [_encode(c, s, i, arrays) for i, (c, s) in enumerate(columns.items())]
    info["format"] = FORMAT
    npz = _arrays_path(Path(json_path))
    with atomic_path(npz) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    with atomic_path(Path(json_path)) as tmp:
        tmp.write_text(json.dumps(info, indent=1, default=_json_default) + "\n", encoding="utf-8")
    return Path(json_path)


def read_summary(json_path: Path) -> tuple[dict, np.ndarray, np.ndarray, dict]:
    """What summarise() returned, from the two files."""
    json_path = Path(json_path)
    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{json_path}: not a readable report summary ({e}); pass the <sample>.summary.json "
                        "written by `uce merge --summary`") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{json_path}: not a report summary of this uce-nf version (format "
                        f"{info.get('format') if isinstance(info, dict) else None!r}, expected {FORMAT!r}); "
                        "re-run its MERGE task")
    npz = _arrays_path(json_path)
    if not npz.is_file():
        raise UserError(f"{json_path}: its arrays file {npz.name} is missing; pass both files `uce merge --summary` wrote")
    with np.load(npz) as z:
        columns = {m["name"]: _decode(m, i, z) for i, m in enumerate(info["columns"])}
        return info, z["pcs"], z["ratio"], columns


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, bytes):
        return o.decode(errors="replace")
    raise TypeError(type(o).__name__)
