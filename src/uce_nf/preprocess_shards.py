"""PREPROCESS's per-chunk work, and the same work over row ranges in worker processes.

The filter needs whole-dataset totals (cells per gene, then genes per cell over the kept genes), so
the parallel path makes three passes over row ranges: count (partial per-gene counts, summed by the
parent), filter (per-cell flags and kept nnz) and write. The output is one gzip-compressed CSR
matrix; HDF5 cannot be written from several processes, so the workers compress the matrix's
chunks themselves, on the output's chunk grid (they know their range's output offset from the
filter pass), and the parent only stores them (`write_direct_chunk`) and the few chunks that
straddle two ranges. Every array is the one the sequential path writes; only the bytes of the
compressed chunks may come from another zlib build.

Kept light (h5py, numpy, scipy): spawned workers import this module, not anndata.
"""

from __future__ import annotations

import resource
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor

import h5py
import numpy as np
import scipy.sparse as sp

from .io import CSRWriter, H5Matrix

CHUNK_ELEMS = 1 << 16  # the output datasets' HDF5 chunk, as io.CSRWriter creates them
GZIP_LEVEL = 1


def cpu_seconds() -> tuple[float, float]:
    """User+system CPU seconds of this process and of its finished children (a worker pool, once
    shut down): how much of a step's work the parent itself did."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def is_counts(m) -> bool:
    d = m.data
    return d.size == 0 or bool(np.all(d >= 0) and np.all(np.mod(d, 1) == 0))


def nonfinite(m) -> tuple[int, int]:
    """(number of NaN/inf values, row of the first one) in a CSR block; (0, -1) when all are finite."""
    bad = ~np.isfinite(m.data)
    n = int(bad.sum())
    if not n:
        return 0, -1
    return n, int(np.searchsorted(m.indptr, np.flatnonzero(bad)[0], side="right") - 1)


def filter_chunk(m: sp.csr_matrix, gene_ok_idx: np.ndarray, genes: np.ndarray, settings) -> tuple:
    """(genes expressed per cell among the min_cells genes, keep, zero-count flag, kept rows on the
    embedded genes with sorted indices) of one row block: the filter's second pass."""
    n_genes = np.diff((m[:, gene_ok_idx] > 0).tocsr().indptr)
    sub = m[:, genes]
    # float32 -> int64 truncation is what the reference's sampler sees (§4.7)
    total = np.asarray(sub.astype(np.float32).astype(np.int64).sum(axis=1)).ravel()
    ok = n_genes >= settings.min_genes if settings.filter else np.ones(m.shape[0], bool)
    kept = sub[np.flatnonzero(ok & (total > 0))]
    kept.sort_indices()
    return n_genes, ok & (total > 0), ok & (total == 0), kept


def row_ranges(n_rows: int, workers: int, chunk: int, max_rows: int = 16384) -> list[tuple[int, int]]:
    """Ranges on the sequential path's chunk grid (so per-chunk checks fall on the same rows): about
    4 per worker, at most max_rows rows each: a worker holds one range's kept rows while it compresses
    them (~260 MB for 16,384 cells of 2,000 expressed genes)."""
    per = -(-n_rows // (4 * workers))
    per = min(max(chunk, -(-per // chunk) * chunk), max(chunk, max_rows // chunk * chunk))
    return [(lo, min(lo + per, n_rows)) for lo in range(0, n_rows, per)]


def ordered_map(pool: ProcessPoolExecutor, fn, jobs, window: int):
    """pool.map with at most `window` jobs submitted and not yet consumed: results arrive in order
    and never pile up in the parent."""
    jobs, pending = iter(jobs), deque()
    for job in jobs:
        pending.append(pool.submit(fn, *job))
        if len(pending) >= window:
            break
    while pending:
        yield pending.popleft().result()
        for job in jobs:
            pending.append(pool.submit(fn, *job))
            break


def _rows(path, x_key, lo, hi, chunk):
    with h5py.File(path, "r") as f:
        X = H5Matrix(f[x_key])
        for start in range(lo, hi, chunk):
            yield start, X.rows(start, min(start + chunk, hi))


def count_range(path, x_key, lo, hi, chunk, n_var) -> dict:
    """Pass 1 over rows [lo, hi): per-gene cell counts, NaN/inf (how many, first row) and the first
    chunk that is not counts among chunks without NaN/inf (the sequential pass stops checking values
    once a NaN/inf is seen, and its messages follow from these)."""
    n_cells = np.zeros(n_var, dtype=np.int64)
    n_bad, first_bad, noncount = 0, -1, None
    for start, m in _rows(path, x_key, lo, hi, chunk):
        b, first = nonfinite(m)
        if b:
            first_bad = start + first if first_bad < 0 else first_bad
            n_bad += b
            continue
        if noncount is None and not is_counts(m):
            noncount = (start, start + m.shape[0] - 1)
        if noncount is None:
            n_cells += np.bincount(m.indices[m.data > 0], minlength=n_var)
    return {"n_cells": n_cells, "n_bad": n_bad, "first_bad": first_bad, "noncount": noncount}


def filter_range(path, x_key, lo, hi, chunk, gene_ok_idx, genes, settings) -> tuple:
    """Pass 2 over rows [lo, hi): per-cell genes, keep and zero flags, nnz of each kept row."""
    parts = [filter_chunk(m, gene_ok_idx, genes, settings) for _, m in _rows(path, x_key, lo, hi, chunk)]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]), np.concatenate([np.diff(p[3].indptr) for p in parts]))


def compress(values: np.ndarray) -> bytes:
    """One full output chunk as HDF5's deflate filter stores it (zlib stream); the last chunk of a
    dataset is zero-padded to the chunk size, as HDF5 stores edge chunks."""
    if len(values) < CHUNK_ELEMS:
        values = np.concatenate([values, np.zeros(CHUNK_ELEMS - len(values), values.dtype)])
    return zlib.compress(values.tobytes(), GZIP_LEVEL)


def write_range(path, x_key, lo, hi, chunk, keep, genes, offset, dtypes) -> dict:
    """Pass 3 over rows [lo, hi): the kept rows on the embedded genes, as (data, indices) starting
    at output element `offset`: raw `head` up to the first chunk boundary, compressed whole chunks,
    raw `tail` after the last boundary (the parent completes the chunks shared with neighbours)."""
    data = [m[np.flatnonzero(keep[start - lo:start - lo + m.shape[0]])][:, genes]
            for start, m in _rows(path, x_key, lo, hi, chunk)]
    for m in data:
        m.sort_indices()
    vals = [np.concatenate([m.data for m in data]).astype(dtypes[0], copy=False),
            np.concatenate([m.indices for m in data]).astype(dtypes[1], copy=False)]
    end = offset + len(vals[0])
    first = min(-(-offset // CHUNK_ELEMS) * CHUNK_ELEMS, end)
    last = max(end // CHUNK_ELEMS * CHUNK_ELEMS, first)
    chunks = [(c, compress(vals[0][c - offset:c - offset + CHUNK_ELEMS]),
               compress(vals[1][c - offset:c - offset + CHUNK_ELEMS])) for c in range(first, last, CHUNK_ELEMS)]
    return {"head": [v[:first - offset] for v in vals], "chunks": chunks, "tail_at": last,
            "tail": [v[last - offset:] for v in vals]}


class ChunkAssembler:
    """Stores the workers' chunks in order into the two datasets, completing boundary chunks."""

    def __init__(self, datasets):
        self.ds, self.at, self.pending = datasets, 0, [[], []]

    def _add(self, pieces, at):
        assert at == self.at + sum(len(p) for p in self.pending[0]), "ranges out of order"
        for buf, p in zip(self.pending, pieces):
            buf.append(p)
        n = sum(len(p) for p in self.pending[0])
        if n >= CHUNK_ELEMS:  # pieces never cross a boundary, so this is exactly one chunk
            self.flush()

    def flush(self):
        if sum(len(p) for p in self.pending[0]):
            for ds, buf in zip(self.ds, self.pending):
                ds.id.write_direct_chunk((self.at,), compress(np.concatenate(buf)))
            self.at += CHUNK_ELEMS
        self.pending = [[], []]

    def add(self, part: dict, offset: int) -> None:
        self._add(part["head"], offset)
        for c, d, i in part["chunks"]:
            assert c == self.at and not sum(len(p) for p in self.pending[0]), "chunk out of order"
            self.ds[0].id.write_direct_chunk((c,), d)
            self.ds[1].id.write_direct_chunk((c,), i)
            self.at = c + CHUNK_ELEMS
        if len(part["tail"][0]):
            self._add(part["tail"], part["tail_at"])


def write_kept_parallel(out: h5py.Group, pool, window: int, path: str, x_key: str, ranges, chunk: int,
                        keep: np.ndarray, genes: np.ndarray, row_nnz: np.ndarray, dtype) -> None:
    """X of the processed file from the workers' compressed chunks: the same group, datasets, dtypes,
    chunking and filter as CSRWriter's appends give."""
    w = CSRWriter(out, "X", len(genes), dtype)
    nnz = int(row_nnz.sum())
    for ds in (w.data, w.indices):
        ds.resize((nnz,))
    kept_before = np.concatenate([[0], np.cumsum([int(keep[lo:hi].sum()) for lo, hi in ranges])])
    nnz_before = np.concatenate([[0], np.cumsum(row_nnz, dtype=np.int64)])[kept_before]
    dtypes = (w.data.dtype, w.indices.dtype)
    asm = ChunkAssembler((w.data, w.indices))
    jobs = [(path, x_key, lo, hi, chunk, keep[lo:hi], genes, int(nnz_before[r]), dtypes) for r, (lo, hi) in enumerate(ranges)]
    for r, part in enumerate(ordered_map(pool, write_range, jobs, window)):
        asm.add(part, int(nnz_before[r]))
    asm.flush()
    w.indptr = [np.concatenate([[0], np.cumsum(row_nnz, dtype=np.int64)])]
    w.nnz, w.n_rows = nnz, int(keep.sum())
    w.close()
