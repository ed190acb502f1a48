"""Nearest neighbours for `uce atlas`: a PCA fitted on the seeded fit sample, exact blockwise kNN
(matrix product + top-k in torch, a block of queries at a time), and deterministic kNN votes.

Why exact and blockwise: the atlas needs the neighbours of up to millions of query cells among a
sample of at most a few 10^5 cells (UMAP/Leiden projection, label transfer). A (block x sample)
similarity matrix of <= 128 MB is the only large temporary, so memory does not grow with the atlas;
the answer does not depend on an approximate index's random graph. torch (already a runtime
dependency) does the product and the top-k several times faster than numpy's argpartition.

Distances are cosine distances, 1 - cos. In PC space (``Space`` with components) they are
|p - q|^2 / 2 of the PC scores: for unit vectors |x - y|^2 / 2 = 1 - cos(x, y) exactly, and the top
PCs keep most of that distance (the PCs' share of variance is reported).
"""

from __future__ import annotations

import numpy as np

SIM_BLOCK_BYTES = 128 << 20


class Space:
    """Where neighbours are searched: X_uce itself (n_pcs 0) or its top PCs from a fit sample."""

    def __init__(self, x: np.ndarray, rows: np.ndarray, n_pcs: int):
        """PCA of the rows `rows` of x (the fit sample)."""
        self.mean = self.components = None
        self.variance_ratio = 1.0
        if n_pcs and n_pcs < x.shape[1]:
            self.mean, self.components, self.variance_ratio = _pca(x, n_pcs, rows)

    @property
    def dims(self) -> int | None:
        return None if self.components is None else self.components.shape[1]

    def __call__(self, x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """x (or its rows `rows`) in the search space, a block at a time: no full-size temporaries."""
        if rows is None:
            rows = slice(None)
        if self.components is None:
            return np.asarray(x[rows], dtype=np.float32)
        n = len(x) if isinstance(rows, slice) else len(rows)
        idx = np.arange(n) if isinstance(rows, slice) else rows
        out = np.empty((n, self.components.shape[1]), dtype=np.float32)
        for s in range(0, n, 8192):
            out[s:s + 8192] = (np.asarray(x[idx[s:s + 8192]], dtype=np.float32) - self.mean) @ self.components
        return out


def _pca(x: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, top-k principal axes (float32, deterministic signs) and their share of the variance, of
    x's rows `rows` (default all)."""
    rows = np.arange(len(x)) if rows is None else rows
    step = 16384  # copies of a block only
    total = np.zeros(x.shape[1], dtype=np.float64)
    for s in range(0, len(rows), step):
        total += x[rows[s:s + step]].sum(axis=0, dtype=np.float64)
    mean = (total / max(len(rows), 1)).astype(np.float32)
    gram = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
    for s in range(0, len(rows), step):
        b = x[rows[s:s + step]] - mean
        gram += (b.T @ b).astype(np.float64)
    w, v = np.linalg.eigh(gram)
    w, v = w[::-1], v[:, ::-1]
    k = max(1, min(k, len(w)))
    v = v[:, :k] * np.where(v[np.abs(v[:, :k]).argmax(axis=0), range(k)] < 0, -1, 1)
    total = float(w.sum())
    return mean, v.astype(np.float32), float(w[:k].sum() / total) if total > 0 else 1.0


def knn(query: np.ndarray, ref: np.ndarray, k: int, *, self_index: np.ndarray | None = None,
        pc_space: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of `ref` for every row of `query`: (indices int64, cosine distances float32),
    nearest first. `self_index[i]`: the row of ref that is query row i itself, placed first (scanpy's
    convention for a neighbour graph, which includes the cell itself)."""
    import torch
    k = min(k, len(ref))
    r = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    half_sq = 0.5 * (r * r).sum(1) if pc_space else None
    block = max(16, SIM_BLOCK_BYTES // (4 * max(1, len(ref))))
    idx = np.empty((len(query), k), dtype=np.int64)
    dist = np.empty((len(query), k), dtype=np.float32)
    with torch.no_grad():
        for s in range(0, len(query), block):
            q = torch.from_numpy(np.ascontiguousarray(query[s:s + block], dtype=np.float32))
            sim = q @ r.T  # cos for unit rows; in PC space q.r - |r|^2/2 = (|q|^2 - |q - r|^2) / 2
            if half_sq is not None:
                sim -= half_sq
            if self_index is not None:
                sim[torch.arange(len(q)), torch.from_numpy(self_index[s:s + len(q)])] = float("inf")
            v, i = torch.topk(sim, k, dim=1)
            base = 0.5 * (q * q).sum(1, keepdim=True) if half_sq is not None else 1.0
            d = (base - v).clamp_min(0)
            if self_index is not None:
                d[:, 0] = 0
            idx[s:s + len(q)] = i.numpy()
            dist[s:s + len(q)] = d.numpy()
    return idx, dist


def vote(codes: np.ndarray, dist: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Majority label of each row's neighbours (codes: label code per neighbour, -1 = none) and the
    fraction of neighbours that voted for it. Ties: the label whose voters are closer in total
    (larger summed similarity 1 - d), then the lower label code: deterministic."""
    n, k = codes.shape
    counts = np.zeros((n, n_labels + 1), dtype=np.float64)
    sims = np.zeros((n, n_labels + 1), dtype=np.float64)
    rows = np.repeat(np.arange(n), k)
    c = np.where(codes < 0, n_labels, codes).ravel()
    np.add.at(counts, (rows, c), 1.0)
    np.add.at(sims, (rows, c), (1.0 - dist.astype(np.float64)).ravel())
    counts, sims = counts[:, :n_labels], sims[:, :n_labels]
    # similarities lie in [-1, 1]: the tie-breaker term stays in [0, 1), below one vote
    key = counts + 0.999 * (sims + k) / (2 * k + 1)
    best = key.argmax(axis=1)  # first maximum: the lower code on an exact tie
    conf = counts[np.arange(n), best] / max(k, 1)
    return best, conf.astype(np.float32)


def weighted_mean(values: np.ndarray, idx: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Neighbour-weighted mean of `values` rows (weights: similarity 1 - d, floored at a small value
    so a row of far neighbours still averages them)."""
    w = np.maximum(1.0 - dist.astype(np.float64), 1e-3)
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("nk,nkd->nd", w, values[idx]).astype(np.float32)
