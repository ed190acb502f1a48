"""Writing the result (uce-reference.md §9), streaming: obsm['X_uce'] is written shard by shard,
a block of rows at a time, so memory stays flat in the number of cells (docs/benchmarks.md).

Two output modes:
- ``full``: the processed AnnData (copied at the file level, the counts are never loaded) plus
  obsm['X_uce'] and uns['uce']: the reference-shaped file.
- ``embeddings``: every input cell in input order with the input's obs, obsm['X_uce'] (NaN rows for
  cells the filters dropped), obs['uce_embedded'], no counts; plus the same rows as Parquet.

In both, obs['uce_input_row'] (int64) and obs['uce_input_name'] say where each cell came from, so
results map back to the input even when its obs names are not unique.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .io import UserError, _json_default, atomic_path, open_h5ad

try:
    from anndata.io import read_elem, write_elem
except ImportError:  # pragma: no cover
    from anndata.experimental import read_elem, write_elem

MODES = ("full", "embeddings")
BLOCK_BYTES = 32 << 20  # rows per read/write: ~32 MB whatever the width (6,553 rows at 1,280 dims)
CHUNK_BYTES = 2 << 20   # HDF5 chunk of X_uce: ~2 MB
NORM_TOL = 1e-3
EMB_KEY = "embeddings"


def _block_rows(dim: int) -> int:
    return max(1, BLOCK_BYTES // (4 * max(dim, 1)))


# --------------------------------------------------------------------------------------- shards

class Shard:
    """One `uce embed` file, read lazily: its small arrays at once, the embedding rows in blocks
    straight from the (uncompressed) npz member, so a shard is never held in memory whole."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            z = np.load(self.path)
            names = set(z.files)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(f"{self.path}: not an embeddings file of `uce embed` ({e}); re-run its EMBED task") from None
        if not {EMB_KEY, "cell_index"} <= names:
            raise UserError(f"{self.path}: no embeddings/cell_index arrays; pass the .embeddings.npz files of `uce embed`")
        # the small entries (precision, device, seconds, ...) for uns['uce']
        self.meta = {k: z[k] for k in sorted(names - {EMB_KEY})}
        self.cell_index = np.asarray(self.meta.pop("cell_index"), dtype=np.int64)
        z.close()
        with zipfile.ZipFile(self.path) as zf, zf.open(EMB_KEY + ".npy") as fp:
            self.shape, self._fortran, self.dtype, self._offset = _npy_header(fp)
        if len(self.shape) != 2 or self.shape[0] != len(self.cell_index) or self.dtype.kind != "f":
            raise UserError(f"{self.path}: embeddings of shape {self.shape} ({self.dtype}) for {len(self.cell_index)} "
                            "cells; the file is corrupt: re-run its EMBED task")

    @property
    def first_cell(self) -> int:
        return int(self.cell_index.min()) if len(self.cell_index) else -1

    def blocks(self, rows: int):
        """(start, float32 rows [start, start + k)) in file order."""
        n, dim = self.shape
        if self._fortran:  # np.savez never writes these; read whole rather than fail
            yield 0, np.load(self.path)[EMB_KEY].astype(np.float32, copy=False)
            return
        row_bytes = dim * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(EMB_KEY + ".npy") as fp:
            fp.read(self._offset)
            for start in range(0, n, rows):
                k = min(rows, n - start)
                buf = fp.read(k * row_bytes)
                if len(buf) != k * row_bytes:
                    raise UserError(f"{self.path}: truncated embeddings file; re-run its EMBED task")
                yield start, np.frombuffer(buf, dtype=self.dtype).reshape(k, dim).astype(np.float32, copy=False)


def _npy_header(fp):
    version = np.lib.format.read_magic(fp)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise UserError(f"unsupported .npy format version {version} in an embeddings file; re-run its EMBED task")
    shape, fortran, dtype = read(fp)
    return shape, fortran, np.dtype(dtype), fp.tell()


def open_shards(paths) -> list[Shard]:
    """The shards ordered by their first cell: the result (and uns['uce']) never depends on the
    order they were passed in."""
    return sorted((Shard(p) for p in paths), key=lambda s: (s.first_cell, str(s.path)))


# --------------------------------------------------------------------------------------- writing

def write_merged(processed: Path, shards: list[Shard], provenance: dict, output: Path, *, mode: str = "full",
                 input_h5ad: Path | None = None, renamed: bool = False, expect_cells: int | None = None) -> dict:
    """Write `output` (and, in embeddings mode, `output` with suffix .parquet). `renamed`: PREPROCESS
    made duplicate obs names unique (stats' duplicate_obs_names), so the original names are in
    obs['original_obs_name']. Returns {cells, embedded, files}."""
    if mode not in MODES:
        raise UserError(f"--output-mode {mode!r}: choose one of {', '.join(MODES)}")
    if not shards:
        raise UserError("no embedding shards given; pass every shard's .embeddings.npz with --embeddings")
    processed = Path(processed)
    with open_h5ad(processed) as p:
        input_row = _input_rows(p, processed)
        # the names are needed only to check --input is the file PREPROCESS read
        names = _original_names(p, renamed) if mode == "embeddings" else None
    n_kept = len(input_row)
    if expect_cells is not None and expect_cells != n_kept:
        raise UserError(f"{processed}: {n_kept} cells but the preprocess stats say {expect_cells}: the stats file "
                        "belongs to another run")
    dims = {s.shape[1] for s in shards}
    if len(dims) != 1:
        raise UserError(f"embedding shards have different widths {sorted(dims)}: they come from different models")
    dim = dims.pop()
    output = Path(output)
    if mode == "full":
        with atomic_path(output, suffix=".h5ad") as tmp:
            shutil.copyfile(processed, tmp)
            with h5py.File(tmp, "r+", rdcc_nbytes=4 * CHUNK_BYTES) as f:
                _add_obs_columns(f["obs"], renamed)
                ds = _create_x_uce(f, n_kept, dim)
                _stream_shards(shards, ds, np.arange(n_kept, dtype=np.int64), n_kept)
                _write_uns(f, provenance)
        return {"cells": n_kept, "embedded": n_kept, "files": [output]}

    if input_h5ad is None:
        raise UserError("--output-mode embeddings needs --input, the h5ad that PREPROCESS read (for its obs)")
    obs = _input_obs(Path(input_h5ad), names, input_row, processed)
    del names
    n_in = len(obs)
    parquet = output.with_suffix(".parquet")
    with atomic_path(output, suffix=".h5ad") as tmp, atomic_path(parquet, suffix=".parquet") as tmp_pq:
        with h5py.File(tmp, "w", rdcc_nbytes=4 * CHUNK_BYTES) as f:
            f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            write_elem(f, "obs", obs)
            # no counts: X is absent and var has no rows (anndata reads it as n_vars = 0)
            write_elem(f, "var", pd.DataFrame(index=pd.Index([], dtype=object)))
            for key in ("obsm", "uns", "layers", "varm", "obsp", "varp"):
                write_elem(f, key, {})
            ds = _create_x_uce(f, n_in, dim)
            _stream_shards(shards, ds, input_row, n_kept)
            _write_uns(f, provenance)
            _write_parquet(tmp_pq, ds, obs, provenance)
    return {"cells": n_in, "embedded": n_kept, "files": [output, parquet]}


def _index_key(obs: h5py.Group) -> str:
    key = obs.attrs.get("_index", "_index")
    return key.decode() if isinstance(key, bytes) else key


def _input_rows(f: h5py.File, path: Path) -> np.ndarray:
    """Row in the input of every processed cell (written by PREPROCESS)."""
    obs = f["obs"]
    if "uce_input_row" not in obs:
        raise UserError(f"{path}: no obs['uce_input_row']: the processed file was written by an older uce-nf; "
                        "re-run PREPROCESS (without -resume, or delete its work folder)")
    rows = np.asarray(read_elem(obs["uce_input_row"]), dtype=np.int64)
    if len(rows) != obs[_index_key(obs)].shape[0] or (len(rows) and rows[0] < 0) or np.any(np.diff(rows) <= 0):
        raise UserError(f"{path}: obs['uce_input_row'] is not a strictly increasing list of input rows; re-run PREPROCESS")
    return rows


def _original_names(f: h5py.File, renamed: bool) -> np.ndarray:
    obs = f["obs"]
    return np.asarray(read_elem(obs["original_obs_name" if renamed else _index_key(obs)]), dtype=object)


def _add_obs_columns(obs: h5py.Group, renamed: bool) -> None:
    """obs['uce_input_name'] of the full output, copied inside HDF5 (no strings through Python);
    uce_input_row is already there from PREPROCESS."""
    src = "original_obs_name" if renamed else _index_key(obs)
    if src not in obs:
        raise UserError(f"{obs.file.filename}: no obs['{src}'] although the preprocess stats count duplicate obs "
                        "names: the stats file belongs to another run")
    if "uce_input_name" in obs:
        del obs["uce_input_name"]
    obs.copy(obs[src], obs, name="uce_input_name")
    order = [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(obs.attrs.get("column-order", []))]
    obs.attrs["column-order"] = [c for c in order if c != "uce_input_name"] + ["uce_input_name"]


def _input_obs(path: Path, names: np.ndarray, input_row: np.ndarray, processed: Path) -> pd.DataFrame:
    """The input's obs (read alone, never its counts) plus uce_input_row, uce_input_name, uce_embedded."""
    with open_h5ad(path) as f:
        obs = read_elem(f["obs"])
    n_in = len(obs)
    if len(input_row) and input_row[-1] >= n_in:
        raise UserError(f"{path}: {n_in} cells, but {processed} has cells from row {input_row[-1]}: pass the h5ad "
                        "that PREPROCESS read with --input")
    in_names = obs.index.to_numpy()  # the index's own str objects: no copies of millions of strings
    step = 1 << 16  # compared in slices: no full-size temporaries
    for lo in range(0, len(input_row), step):
        if not np.array_equal(in_names[input_row[lo:lo + step]], names[lo:lo + step]):
            raise UserError(f"{path}: its obs names differ from those of {processed}: pass the h5ad that PREPROCESS "
                            "read with --input")
    embedded = np.zeros(n_in, dtype=bool)
    embedded[input_row] = True
    obs["uce_input_row"] = np.arange(n_in, dtype=np.int64)
    obs["uce_input_name"] = in_names
    obs["uce_embedded"] = embedded
    return obs


def _create_x_uce(f: h5py.File, n: int, dim: int) -> h5py.Dataset:
    """obsm['X_uce'] at its final shape, NaN until written: rows no shard writes (cells the filters
    dropped) read back as NaN without ever being written."""
    if "obsm" not in f:
        write_elem(f, "obsm", {})
    if "X_uce" in f["obsm"]:
        del f["obsm"]["X_uce"]
    chunk = (max(1, min(n, CHUNK_BYTES // (4 * dim))), dim)
    ds = f["obsm"].create_dataset("X_uce", shape=(n, dim), dtype=np.float32, chunks=chunk if n else None,
                                  fillvalue=np.float32(np.nan))
    ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})  # what anndata's reader expects
    return ds


def _stream_shards(shards: list[Shard], ds: h5py.Dataset, target: np.ndarray, n_kept: int) -> None:
    """Each shard's rows to ds[target[cell_index]]; checks every processed cell comes exactly once
    and every row is finite with unit norm, per block (no full-size temporaries)."""
    seen = np.zeros(n_kept, dtype=bool)
    rows = _block_rows(ds.shape[1])
    for s in shards:
        ci = s.cell_index
        if len(ci) and (ci.min() < 0 or ci.max() >= n_kept):
            raise UserError(f"{s.path}: cell index {int(ci.max())} beyond the {n_kept} processed cells: "
                            "the shard belongs to another run")
        if seen[ci].any() or len(np.unique(ci)) != len(ci):
            raise UserError(f"{s.path}: contains cells already given by another shard; pass each shard once")
        seen[ci] = True
        for start, emb in s.blocks(rows):
            _check_norms(emb, s, start)
            _write_block(ds, target, ci[start:start + len(emb)], emb)
    if not seen.all():
        raise UserError(f"{int((~seen).sum())} of {n_kept} cells have no embedding: a shard is missing; "
                        "pass every shard of this dataset with --embeddings")


def _check_norms(emb: np.ndarray, s: Shard, start: int) -> None:
    norms = np.sqrt(np.einsum("ij,ij->i", emb, emb, dtype=np.float64))
    bad = ~(np.abs(norms - 1) < NORM_TOL)  # NaN norms are bad too
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"{s.path}: {int(bad.sum())} embeddings are not finite unit vectors (first: processed cell "
                        f"{int(s.cell_index[start + i])}, norm {norms[i]:.4g}); refusing to write a corrupt result: "
                        "re-run its EMBED task")


def _write_block(ds: h5py.Dataset, target: np.ndarray, ci: np.ndarray, emb: np.ndarray) -> None:
    """Write rows emb (processed cells ci) to output rows target[ci]. Runs of consecutive processed
    cells go out as spans of at most one block; output rows inside a span that no cell of the run
    maps to are cells the filters dropped, so filling them with NaN never overwrites an embedding."""
    order = np.argsort(ci, kind="stable")
    ci = ci[order]
    cap = len(emb) if len(emb) else 1
    for run in np.split(np.arange(len(ci)), np.flatnonzero(np.diff(ci) != 1) + 1):
        pos = target[ci[run]]
        i = 0
        while i < len(run):
            j = int(np.searchsorted(pos, pos[i] + cap))
            lo, hi = int(pos[i]), int(pos[j - 1]) + 1
            src = order[run[i:j]]
            rows = emb[src[0]:src[0] + len(src)] if np.all(np.diff(src) == 1) else emb[src]  # a view when in order
            if hi - lo == j - i:
                ds[lo:hi] = rows
            else:
                buf = np.full((hi - lo, emb.shape[1]), np.nan, dtype=np.float32)
                buf[pos[i:j] - lo] = rows
                ds[lo:hi] = buf
            i = j


def _write_uns(f: h5py.File, provenance: dict) -> None:
    if "uns" not in f:
        write_elem(f, "uns", {})
    if "uce" in f["uns"]:
        del f["uns"]["uce"]
    write_elem(f["uns"], "uce", _h5_safe(provenance))


def _write_parquet(path: Path, ds: h5py.Dataset, obs: pd.DataFrame, provenance: dict) -> None:
    """The embeddings as Parquet, in row groups read back from X_uce (so both files hold the same
    numbers): obs_name, uce_input_row, uce_embedded, X_uce as fixed_size_list<float32>[dim]."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("--output-mode embeddings writes Parquet and needs pyarrow: pip install pyarrow "
                        "(envs/requirements.txt pins it; the container image has it)") from None
    n, dim = ds.shape
    schema = pa.schema([("obs_name", pa.string()), ("uce_input_row", pa.int64()), ("uce_embedded", pa.bool_()),
                        ("X_uce", pa.list_(pa.float32(), dim))],
                       metadata={"uce": json.dumps(provenance, default=_json_default, sort_keys=True)})
    names = obs.index.to_numpy()
    embedded = obs["uce_embedded"].to_numpy()
    rows = _block_rows(dim)
    # X_uce uncompressed and without dictionary: float embeddings do not compress, trying costs CPU
    with pq.ParquetWriter(path, schema, use_dictionary=False,
                          compression={"obs_name": "zstd", "uce_input_row": "zstd", "uce_embedded": "zstd",
                                       "X_uce": "none"}) as w:
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            x = ds[start:stop]
            w.write_table(pa.table({
                "obs_name": pa.array(names[start:stop], pa.string()),
                "uce_input_row": pa.array(np.arange(start, stop, dtype=np.int64)),
                "uce_embedded": pa.array(embedded[start:stop]),
                "X_uce": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), dim),
            }, schema=schema))


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
