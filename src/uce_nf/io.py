"""Small I/O helpers shared by every step: atomic writes, errors users can act on, and
chunked reads of (possibly huge) AnnData matrices straight from HDF5, without densifying."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import scipy.sparse as sp


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


def handle_errors(fn):
    """Decorator for click commands: a UserError becomes `ERROR: <one line>` and exit status 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **k):
        import sys

        import click
        try:
            return fn(*a, **k)
        except UserError as e:
            click.echo(f"ERROR: {e}", err=True)
            sys.exit(2)
    return wrapper


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it to `final` only if the block succeeds.
    Readers never see a half-written file, and a crash leaves the old file (if any) intact."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp" + suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should be as readable as any file
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_tagged(path: str | os.PathLike, fmt: str, what: str, made_by: str, weights_only: bool = True) -> dict:
    """torch.load of one of our own files, whose dict carries `format`: a wrong or broken file is one
    line naming the command that makes it."""
    import torch
    try:
        try:  # memory-mapped: MERGE and the report read a few fields of a species file that holds GBs of weights
            obj = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError:  # not the zip format
            obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        raise UserError(f"{path}: not {what} from `{made_by}` ({type(e).__name__}); run `{made_by}` again") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise UserError(f"{path}: not {what} of format {fmt}; run `{made_by}` again")
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def save_npz(path: str | os.PathLike, **arrays) -> None:
    """np.savez, atomically (np.savez appends .npz to names without it, so keep the suffix)."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


class H5Matrix:
    """Row-chunked reader for an AnnData matrix element (dense, CSR or CSC) in an open h5py file.
    CSR and dense read only the requested rows; CSC has no cheap row access and is read whole once."""

    def __init__(self, node: h5py.Group | h5py.Dataset):
        self.node = node
        if isinstance(node, h5py.Dataset):
            self.kind = "dense"
            self.shape = tuple(node.shape)
        else:
            enc = _attr(node, "encoding-type")
            if enc not in ("csr_matrix", "csc_matrix"):
                raise UserError(f"{node.file.filename}: matrix '{node.name}' has unsupported encoding '{enc}'; "
                                "re-save the file with a recent anndata (sparse CSR or dense X)")
            self.kind = enc[:3]
            self.shape = tuple(int(s) for s in node.attrs["shape"])
            self._whole = None

    @property
    def dtype(self):
        return self.node.dtype if self.kind == "dense" else self.node["data"].dtype

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) as CSR (dtype of the file)."""
        if self.kind == "dense":
            return sp.csr_matrix(self.node[start:stop])
        if self.kind == "csc":
            if self._whole is None:
                g = self.node
                self._whole = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=self.shape).tocsr()
            return self._whole[start:stop]
        g = self.node
        indptr = g["indptr"][start:stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        data = g["data"][lo:hi]
        indices = g["indices"][lo:hi]
        return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self.shape[1]))

    def iter_rows(self, chunk: int = 8192) -> Iterator[tuple[int, sp.csr_matrix]]:
        for start in range(0, self.shape[0], chunk):
            yield start, self.rows(start, min(start + chunk, self.shape[0]))


def _attr(node, key):
    v = node.attrs.get(key)
    return v.decode() if isinstance(v, bytes) else v


def open_h5ad(path: str | os.PathLike, rows: int | None = None) -> h5py.File:
    """Open an h5ad read-only, turning 'not HDF5 / truncated' into a one-line user error.
    Other input formats (AnnData zarr, Cell Ranger h5 and mtx folders; formats.py) are detected by
    content and opened as an h5ad converted on the fly; `rows` limits such a conversion to the first
    rows' counts (for checks that read metadata and a sample of rows)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found; check the path in the samplesheet")
    from . import formats
    fmt = formats.detect(path)
    if fmt != formats.H5AD:
        return formats.open_converted(path, fmt, rows)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: not a readable h5ad (HDF5) file ({str(e).splitlines()[0]}); "
                        "re-export it with anndata's write_h5ad") from None
    if "X" not in f and "raw" not in f and "layers" not in f:
        f.close()
        raise UserError(f"{path}: HDF5 file has no X, raw or layers: not an AnnData h5ad")
    return f


class CSRWriter:
    """Appends CSR row blocks to an AnnData-encoded sparse matrix in an h5py group, so a processed
    matrix of any size is written without ever being held in memory. Column indices are int32 when
    they fit (always, for genes), indptr int32 when the nnz does, and data and indices are gzip-1
    compressed: count matrices shrink several-fold at little CPU cost (docs/benchmarks.md)."""

    def __init__(self, parent: h5py.Group, key: str, n_cols: int, dtype, index_dtype=None, compression="gzip"):
        self.g = parent.create_group(key)
        self.g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
        self.n_cols, self.n_rows, self.nnz = n_cols, 0, 0
        index_dtype = index_dtype or (np.int32 if n_cols < 2**31 else np.int64)
        opts = {"compression": compression, "compression_opts": 1} if compression == "gzip" else {"compression": compression}
        self.data = self.g.create_dataset("data", (0,), dtype=dtype, maxshape=(None,), chunks=(1 << 16,), **opts)
        self.indices = self.g.create_dataset("indices", (0,), dtype=index_dtype, maxshape=(None,), chunks=(1 << 16,),
                                             **opts)
        self.indptr = [np.zeros(1, dtype=np.int64)]

    def append(self, m: sp.csr_matrix) -> None:
        n = m.nnz
        for ds, values in ((self.data, m.data), (self.indices, m.indices)):
            ds.resize((self.nnz + n,))
            ds[self.nnz:] = values
        self.indptr.append(m.indptr[1:].astype(np.int64) + self.nnz)
        self.nnz += n
        self.n_rows += m.shape[0]

    def close(self) -> None:
        indptr = np.concatenate(self.indptr)
        self.g.create_dataset("indptr", data=indptr.astype(np.int32) if self.nnz < 2**31 else indptr)
        self.g.attrs["shape"] = (self.n_rows, self.n_cols)


class Progress:
    """Progress for long steps: a live bar when stderr is a terminal, otherwise a log line every
    `every` seconds (what a Nextflow task's .command.log should show)."""

    def __init__(self, total: int, desc: str, unit: str = "cells", every: float = 30.0):
        import logging
        import sys
        import time
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done, self.t0, self.last = 0, time.time(), time.time()
        self.log = logging.getLogger("uce_nf.progress")
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=desc, unit=unit.rstrip("s"), leave=False)
            except ImportError:  # tqdm is optional
                pass

    def update(self, n: int) -> None:
        import time
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.time() - self.last >= self.every or self.done >= self.total:
            rate = self.done / max(time.time() - self.t0, 1e-9)
            self.log.info("%s: %d/%d %s (%.1f %s/s)", self.desc, self.done, self.total, self.unit, rate, self.unit)
            self.last = time.time()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
