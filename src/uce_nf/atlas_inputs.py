"""Inputs of `uce atlas`: the MERGE outputs, checked before any heavy work (one-line errors), and
their obs columns, read without the counts or X_uce."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .io import UserError
from .report import COLOR_PATTERNS, default_color_column, obs_kinds

try:
    from anndata.io import read_elem
except ImportError:  # pragma: no cover
    from anndata.experimental import read_elem

# obs columns the atlas writes itself: an input column of the same name is not carried
RESERVED = ("sample", "species", "uce_embedded", "uce_input_row", "uce_input_name", "leiden",
            "uce_label_transfer", "uce_label_transfer_confidence")


@dataclass
class Input:
    sample: str
    species: str
    path: Path
    n_rows: int
    dim: int
    embedded: np.ndarray  # bool per input row: rows the atlas takes
    kinds: dict

    @property
    def n_cells(self) -> int:
        return int(self.embedded.sum())


def _index_key(obs: h5py.Group) -> str:
    key = obs.attrs.get("_index", "_index")
    return key.decode() if isinstance(key, bytes) else key


def open_input(path: Path, sample: str, species: str) -> Input:
    hint = "pass a MERGE output (<id>_uce_adata.h5ad or <id>_uce.h5ad)"
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: not a readable h5ad file ({str(e).splitlines()[0]}); {hint}") from None
    with f:
        if "obsm" not in f or "X_uce" not in f["obsm"] or not isinstance(f["obsm"]["X_uce"], h5py.Dataset):
            raise UserError(f"{path} (sample {sample}): no obsm['X_uce'] matrix; {hint}")
        ds = f["obsm"]["X_uce"]
        if ds.ndim != 2 or ds.dtype.kind != "f":
            raise UserError(f"{path} (sample {sample}): obsm['X_uce'] is {ds.dtype} of shape {ds.shape}, not a 2-D "
                            f"float matrix; {hint}")
        n, dim = (int(s) for s in ds.shape)
        obs = f["obs"] if "obs" in f else None
        if obs is None or "uce_input_row" not in obs:
            raise UserError(f"{path} (sample {sample}): no obs['uce_input_row']; {hint} of this uce-nf version")
        embedded = (np.asarray(read_elem(obs["uce_embedded"]), dtype=bool) if "uce_embedded" in obs
                    else np.ones(n, dtype=bool))
        if len(embedded) != n:
            raise UserError(f"{path} (sample {sample}): obs has {len(embedded)} rows but X_uce {n}; {hint}")
        if not embedded.any():
            raise UserError(f"{path} (sample {sample}): no embedded cells (obs['uce_embedded'] is False everywhere or "
                            "the file has no cells); drop this sample from the atlas or fix its input")
        kinds = obs_kinds(f)
    return Input(sample, species, Path(path), n, dim, embedded, kinds)


def open_inputs(adatas, samples, species) -> list[Input]:
    if not adatas:
        raise UserError("no --adata given; pass each dataset with --adata, --sample and --species")
    if not (len(adatas) == len(samples) == len(species)):
        raise UserError(f"--adata given {len(adatas)} times, --sample {len(samples)}, --species {len(species)}: "
                        "pass one --sample and one --species per --adata, in the same order")
    dup = sorted({s for s in samples if list(samples).count(s) > 1})
    if dup:
        raise UserError(f"--sample {', '.join(dup)} given more than once; sample ids must be unique")
    inputs = [open_input(Path(p), s, sp) for p, s, sp in zip(adatas, samples, species)]
    dims = {i.dim for i in inputs}
    if len(dims) != 1:
        raise UserError("X_uce widths differ between datasets (" + ", ".join(f"{i.sample}: {i.dim}" for i in inputs)
                        + "); they come from different models; an atlas needs one model")
    return inputs


def choose_columns(inputs: list[Input], obs_columns, label_column: str | None,
                   references) -> tuple[list[str], str | None, dict]:
    """(obs columns to carry, label column, notes). Checks names, references and the label column."""
    by_name = {i.sample: i for i in inputs}
    unknown = [r for r in references if r not in by_name]
    if unknown:
        raise UserError(f"--reference-sample {', '.join(unknown)}: not a --sample of this atlas (samples: "
                        f"{', '.join(by_name)})")
    notes = {}
    if obs_columns:
        bad = [c for c in obs_columns if c in RESERVED]
        if bad:
            raise UserError(f"--obs-column {', '.join(bad)}: the atlas writes obs columns of that name itself; "
                            "carry another column")
        absent = [c for c in obs_columns if not any(c in i.kinds for i in inputs)]
        if absent:
            raise UserError(f"--obs-column {', '.join(absent)}: in no dataset's obs; check the name")
        cols = list(dict.fromkeys(obs_columns))
    else:  # auto: cell-type-like categorical/string columns of any dataset (report.py's patterns)
        cols = []
        for i in inputs:
            cols += [c for c, k in i.kinds.items() if k in ("categorical", "string")
                     and any(p in c.lower() for p in COLOR_PATTERNS) and c not in cols]
        skipped = [c for c in cols if c in RESERVED]
        if skipped:
            notes["obs_columns_not_carried"] = {c: "name used by the atlas itself" for c in skipped}
        cols = [c for c in cols if c not in RESERVED]
    if label_column is None:
        pool = [by_name[r] for r in references] or inputs
        for i in pool:
            label_column = default_color_column({c: k for c, k in i.kinds.items() if c not in RESERVED})
            if label_column:
                notes["label_column_auto"] = True
                break
        if references and label_column is None:
            raise UserError(f"--reference-sample {', '.join(references)}: no cell-type-like obs column found; pass "
                            "--label-column")
    elif label_column in RESERVED:
        raise UserError(f"--label-column {label_column}: a column the atlas writes itself; pick the cell-type column")
    elif not any(label_column in i.kinds for i in inputs):
        raise UserError(f"--label-column {label_column}: in no dataset's obs; check the name")
    for r in references:
        if label_column not in by_name[r].kinds:
            raise UserError(f"--label-column {label_column}: not in the obs of reference sample {r} "
                            f"({by_name[r].path}); pick a reference that has the labels, or another column")
    if label_column and label_column not in cols:
        cols.append(label_column)
    return cols, label_column, notes


def _column(f: h5py.File, col: str, rows: np.ndarray) -> pd.Series:
    v = read_elem(f["obs"][col])
    s = pd.Series(v) if isinstance(v, (pd.Categorical, pd.Series, pd.Index)) else pd.Series(np.asarray(v))
    return s.iloc[rows].reset_index(drop=True)


def read_obs(inputs: list[Input], columns: list[str]) -> pd.DataFrame:
    """obs of the atlas: one row per embedded cell, samplesheet order. Names are '<sample>:<obs name>'
    (unique across datasets; the dataset's own name in uce_input_name)."""
    parts = {c: [] for c in ["_name", "sample", "species", "uce_input_row", "uce_input_name", *columns]}
    numeric = {c: all(i.kinds.get(c, "numeric") == "numeric" for i in inputs) for c in columns}
    for i in inputs:
        rows = np.flatnonzero(i.embedded)
        with h5py.File(i.path, "r") as f:
            obs = f["obs"]
            names = _column(f, _index_key(obs), rows).astype(str).to_numpy(dtype=object)
            parts["_name"].append((f"{i.sample}:" + pd.Series(names, dtype=str)).to_numpy(dtype=object))
            parts["uce_input_row"].append(np.asarray(_column(f, "uce_input_row", rows), dtype=np.int64))
            parts["uce_input_name"].append(_column(f, "uce_input_name", rows).astype(str).to_numpy(dtype=object)
                                           if "uce_input_name" in obs else names)
            for c in columns:
                if c not in obs:
                    parts[c].append(np.full(len(rows), np.nan if numeric[c] else None, dtype=float if numeric[c] else object))
                else:
                    s = _column(f, c, rows)
                    parts[c].append(s.to_numpy(dtype=float) if numeric[c] else
                                    s.astype(object).where(s.notna(), None).to_numpy(dtype=object))
        parts["sample"].append(np.full(len(rows), i.sample, dtype=object))
        parts["species"].append(np.full(len(rows), i.species, dtype=object))
    index = pd.Index(np.concatenate(parts.pop("_name")), dtype=object)
    if not index.is_unique:  # a ':' in sample ids can collide; fall back to positions
        index = pd.Index([f"{s}:{k}" for s, n in ((i.sample, i.n_cells) for i in inputs) for k in range(n)], dtype=object)
    samples = [i.sample for i in inputs]
    df = pd.DataFrame(index=index)
    df["sample"] = pd.Categorical(np.concatenate(parts.pop("sample")), categories=samples)
    df["species"] = pd.Categorical(np.concatenate(parts.pop("species")),
                                   categories=list(dict.fromkeys(i.species for i in inputs)))
    df["uce_input_row"] = np.concatenate(parts.pop("uce_input_row"))
    df["uce_input_name"] = np.concatenate(parts.pop("uce_input_name")).astype(str)
    for c in columns:
        v = np.concatenate(parts[c])
        df[c] = v if numeric[c] else pd.Categorical([None if x is None else str(x) for x in v])
    df["uce_embedded"] = True
    return df
