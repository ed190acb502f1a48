"""The 2-D map of each sample for `uce report`: PCA by default, UMAP on request, as a PNG.

PCA of a seeded sample of up to 20,000 cells takes about 2 s. UMAP (umap-learn, a scanpy dependency)
costs ~20 s of numba compilation plus ~1 min per 5,000 cells on the 1-2 CPUs of a report task, and
scanpy 1.10's own ``neighbors`` fails with scipy >= 1.14 above 4,096 cells; so ``--map umap`` is
opt-in, runs umap-learn directly on the top 50 PCs of the same sample, and falls back to PCA (with a
warning) if it fails. The 20 most frequent categories get a colour and a legend entry, the rest grey.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .report import Sample

log = logging.getLogger("uce_nf.report")

TOP_CATEGORIES = 20


def pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k principal components (scores) and explained-variance ratios; deterministic signs."""
    x = np.array(x, dtype=np.float32)  # a copy; float32 keeps a 20k x 1280 sample at 100 MB
    x[~np.isfinite(x)] = 0
    x -= x.mean(axis=0, dtype=np.float64).astype(np.float32)
    k = max(1, min(k, x.shape[1], max(1, x.shape[0] - 1)))
    if x.shape[0] >= x.shape[1]:
        gram = (x.T @ x).astype(np.float64)
        w, v = np.linalg.eigh(gram)
        w, v = w[::-1][:k], v[:, ::-1][:, :k]
        total = float(np.trace(gram))
    else:
        _, sv, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
        w, v = (sv ** 2)[:k], vt[:k].T
        total = float((sv ** 2).sum())
    v = v * np.where(v[np.abs(v).argmax(axis=0), range(v.shape[1])] < 0, -1, 1)
    ratio = w / total if total > 0 else np.zeros_like(w)
    scores = x @ v.astype(np.float32)
    if scores.shape[1] < 2:
        scores = np.hstack([scores, np.zeros((len(scores), 2 - scores.shape[1]))])
        ratio = np.append(ratio, 0.0)
    return scores, ratio


def project(pcs: np.ndarray, ratio: np.ndarray, method: str, seed: int,
            name: str) -> tuple[np.ndarray, tuple[str, str], str]:
    """The 2-D map from the top (up to 50) principal components of the sampled cells and their
    explained-variance ratios (report_summary.summarise): PCA is the first two, UMAP is fitted on all."""
    x = pcs
    if method == "umap" and len(x) >= 10:
        try:
            import umap  # scanpy's dependency
            log.info("%s: UMAP of %d cells (slow: numba compilation, ~1 min per 5k cells)", name, len(x))
            import warnings
            with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": seeded on purpose
                warnings.simplefilter("ignore", UserWarning)
                y = umap.UMAP(n_neighbors=min(15, len(x) - 1), min_dist=0.5, random_state=seed).fit_transform(pcs)
            return np.asarray(y), ("UMAP1", "UMAP2"), "umap"
        except Exception as e:  # noqa: BLE001 - the map is optional; PCA always works
            log.warning("%s: UMAP failed (%s: %s); using PCA", name, type(e).__name__, e)
    log.info("%s: PCA of %d cells", name, len(x))
    y = pcs
    return y[:, :2], (f"PC1 ({100 * ratio[0]:.1f}%)", f"PC2 ({100 * ratio[1]:.1f}%)"), "pca"


OTHER = (0.85, 0.85, 0.85, 1.0)
NA = "\x00NA"  # a label no real category has


def _palette(k: int):
    """Distinct colours, none of them grey (grey is for the categories beyond the top 20)."""
    import matplotlib
    if k <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9, 7)][:k]  # tab10's grey (7) last
    t20, t20b = matplotlib.colormaps["tab20"], matplotlib.colormaps["tab20b"]
    return ([t20(i) for i in range(20) if i not in (14, 15)] + [t20b(0), t20b(8)])[:k]


def plot_map(s: Sample, y: np.ndarray, axes_labels: tuple[str, str], colors: list, seed: int) -> bytes:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(y)
    size = float(np.clip(40_000 / max(n, 1), 0.5, 18))
    order = np.random.default_rng(seed).permutation(n)  # no category painted over all others
    panels = len(colors)
    fig, axes = plt.subplots(1, panels, figsize=(6.6 * panels, 4.6), squeeze=False, dpi=100)
    for ax, (col, values) in zip(axes[0], colors):
        ax.set_xlabel(axes_labels[0], fontsize=9)
        ax.set_ylabel(axes_labels[1], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for sp_ in ax.spines.values():
            sp_.set_color("#bbbbbb")
        if values is None:
            ax.scatter(y[order, 0], y[order, 1], s=size, c="#3b6ea5", linewidths=0, rasterized=True)
            ax.set_title(f"{s.name}: no cell-type column to colour by", fontsize=10)
            continue
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values) \
            and not isinstance(values.dtype, pd.CategoricalDtype)
        ax.set_title(f"{s.name}: {col}", fontsize=10)
        if numeric:
            v = values.to_numpy(dtype=float)
            sc_ = ax.scatter(y[order, 0], y[order, 1], s=size, c=v[order], cmap="viridis", linewidths=0,
                             rasterized=True)
            fig.colorbar(sc_, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=8)
            continue
        # cells without a value are grey, behind, like the categories beyond the top 20
        labels = values.astype(object).where(values.notna(), NA).astype(str).to_numpy()
        counts = pd.Series(labels).value_counts(sort=True)
        n_na = int(counts.pop(NA)) if NA in counts.index else 0
        top = list(counts.index[:TOP_CATEGORIES])
        pal = dict(zip(top, _palette(len(top))))
        rgba = np.array([pal.get(lab, OTHER) for lab in labels])
        rest = ~np.isin(labels, top)
        order = np.concatenate([order[rest[order]], order[~rest[order]]])  # the grey rest behind
        ax.scatter(y[order, 0], y[order, 1], s=size, c=rgba[order], linewidths=0, rasterized=True)
        handles = [plt.Line2D([], [], marker="o", ls="", color=pal[c], markersize=6, label=f"{c} ({counts[c]})")
                   for c in top]
        if len(counts) > TOP_CATEGORIES:
            rest = int(counts.iloc[TOP_CATEGORIES:].sum())
            handles.append(plt.Line2D([], [], marker="o", ls="", color=OTHER, markersize=6,
                                      label=f"{len(counts) - TOP_CATEGORIES} others ({rest})"))
        if n_na:
            handles.append(plt.Line2D([], [], marker="o", ls="", color=OTHER, markersize=6, label=f"no value ({n_na})"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5, frameon=False,
                  handletextpad=0.2, borderaxespad=0.0, labelspacing=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
