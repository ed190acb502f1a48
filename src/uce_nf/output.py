"""Writing the result: the processed AnnData plus obsm['X_uce'] and uns['uce'] (uce-reference.md §9).

The processed file is copied and the embedding added with h5py, so the counts matrix is never loaded
into memory. The copy is renamed into place only once complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np

from .io import UserError, atomic_path

try:
    from anndata.io import write_elem
except ImportError:  # pragma: no cover
    from anndata.experimental import write_elem


def gather_embeddings(n_cells: int, shards: list[dict]) -> np.ndarray:
    """Put every shard's rows in processed-cell order; every cell exactly once."""
    dim = shards[0]["embeddings"].shape[1]
    out = np.full((n_cells, dim), np.nan, dtype=np.float32)
    seen = np.zeros(n_cells, dtype=bool)
    for s in shards:
        idx = s["cell_index"]
        if seen[idx].any():
            raise UserError("two embedding shards contain the same cells; pass each shard once")
        out[idx], seen[idx] = s["embeddings"], True
    if not seen.all():
        raise UserError(f"{int((~seen).sum())} of {n_cells} cells have no embedding: a shard is missing")
    return out


def write_output(processed: Path, embeddings: np.ndarray, provenance: dict, path: Path) -> None:
    norms = np.linalg.norm(embeddings, axis=1)
    if not np.all(np.abs(norms - 1) < 1e-3):
        raise RuntimeError("embeddings are not unit norm: refusing to write a corrupt result")
    with atomic_path(path, suffix=".h5ad") as tmp:
        shutil.copyfile(processed, tmp)
        with h5py.File(tmp, "r+") as f:
            if f["obs"][f["obs"].attrs["_index"]].shape[0] != embeddings.shape[0]:
                raise UserError(f"{processed}: {f['obs'][f['obs'].attrs['_index']].shape[0]} cells but "
                                f"{embeddings.shape[0]} embeddings; the shards belong to another run")
            if "obsm" not in f:
                write_elem(f, "obsm", {})
            write_elem(f["obsm"], "X_uce", embeddings.astype(np.float32))
            if "uns" not in f:
                write_elem(f, "uns", {})
            write_elem(f["uns"], "uce", _h5_safe(provenance))


def _h5_safe(obj):
    """uns values must be HDF5-friendly: no None, nested dicts of scalars/strings/arrays. Types are
    kept (an int stays an int, a bool a bool), so readers can compute with uns['uce'] directly."""
    if isinstance(obj, dict):
        return {str(k): _h5_safe(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, np.ndarray) and obj.ndim == 0:
        obj = obj.item()  # 0-d arrays (np.load of a scalar) become the scalar they hold
    if isinstance(obj, (bool, np.bool_)):  # before int: bool is an int subclass
        return np.bool_(obj)
    if isinstance(obj, (int, np.integer)):
        return np.int64(obj)
    if isinstance(obj, (float, np.floating)):
        return np.float64(obj)
    if isinstance(obj, (list, tuple)):
        if not obj:
            return np.array([], dtype="S1")
        values = [_h5_safe(v) for v in obj]
        kinds = {type(v) for v in values}
        if kinds <= {np.bool_} or kinds <= {np.int64} or kinds <= {np.int64, np.float64}:
            return np.array(values)
        return np.array([str(v) for v in obj])  # mixed or strings: one string array
    if isinstance(obj, (Path, bytes)):
        return obj.decode() if isinstance(obj, bytes) else str(obj)
    return obj
