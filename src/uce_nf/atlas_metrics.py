"""Integration metrics of the atlas, following the scIB definitions (Luecken et al. 2022), computed
with scikit-learn's silhouette and our exact kNN on X_uce (cosine), on a seeded sample of at most
--metrics-max-cells cells.

Why not scib-metrics: its current releases (0.6.x) require Python >= 3.12 (the container runs
3.11), older ones bring JAX (hundreds of MB in the image) and JIT-compile on first use, which costs
more than the whole computation on the small CPU tasks of the pipeline. The definitions are short:

label_asw        (silhouette(X, label, cosine) + 1) / 2: 1 = labels perfectly separated.
batch_asw        scIB's batch silhouette: for each label present in >= 2 batches (samples), the
                 silhouette of its cells with the batch as cluster, s -> 1 - |s|, averaged over the
                 label's cells; then averaged over labels. 1 = batches fully mixed within each label,
                 near 0 = batches separated. Needs a label column.
ilisi            integration LISI, unweighted: per cell, the inverse Simpson index of the batches
                 among its 30 nearest neighbours (1 = one batch, B = B batches in equal shares), mean
                 over cells; ilisi_scaled = (ilisi - 1) / (B - 1) in [0, 1]. scIB weights neighbours
                 with a Gaussian kernel of perplexity 30; equal weights keep it exact and cheap.
knn_label_consistency   fraction of each cell's k nearest neighbours with the cell's label, mean.

Batch metrics are skipped with one sample, label metrics without a label column; the summary
says so.
"""

from __future__ import annotations

import time

import numpy as np

from .atlas_knn import knn

LISI_NEIGHBOURS = 30


def integration_metrics(x: np.ndarray, batch: np.ndarray | None, labels: np.ndarray | None, k: int) -> dict:
    """x: unit rows (the sample); batch: codes per row (None: one batch); labels: per row, None/NaN = no
    label (None: no label column). Returns {metrics, skipped, seconds}."""
    import sklearn
    with sklearn.config_context(working_memory=128):  # MB of distance rows at a time (default 1 GB)
        return _metrics(x, batch, labels, k)


def _metrics(x, batch, labels, k) -> dict:
    from sklearn.metrics import silhouette_samples, silhouette_score
    t0 = time.time()
    metrics, skipped = {}, {}
    n = len(x)
    n_batches = 0 if batch is None else len(np.unique(batch))
    has_label = None
    if labels is not None:
        lab = np.asarray(labels, dtype=object)
        has_label = np.array([v is not None and v == v for v in lab])  # v == v is False for NaN
        lab = lab[has_label].astype(str)
        codes = np.unique(lab, return_inverse=True)[1]
    kk = max(k, LISI_NEIGHBOURS) if n_batches >= 2 else k
    idx, _ = knn(x, x, min(kk + 1, n), self_index=np.arange(n)) if n >= 2 else (np.zeros((n, 0), int), None)
    idx = idx[:, 1:]  # the cell itself is first

    if labels is None:
        skipped.update(label_asw="no label column", knn_label_consistency="no label column",
                       batch_asw="no label column (scIB's batch ASW is computed within labels)")
    elif len(np.unique(codes)) < 2 or has_label.sum() < 3:
        skipped.update(label_asw="fewer than 2 labels among the sampled cells")
    else:
        xl = x[has_label]
        metrics["label_asw"] = (float(silhouette_score(xl, codes, metric="cosine")) + 1) / 2
    if labels is not None and has_label.sum() and idx.shape[1]:
        full = np.full(n, -1, dtype=np.int64)
        full[has_label] = codes
        nb = full[idx[has_label, :k]]
        metrics["knn_label_consistency"] = float(np.mean(nb == full[has_label][:, None]))

    if n_batches < 2:
        for m in ("batch_asw", "ilisi", "ilisi_scaled"):
            skipped.setdefault(m, "one sample: no batches to mix")
    else:
        nb = batch[idx]
        share = np.stack([(nb == b).mean(axis=1) for b in np.unique(batch)], axis=1)
        ilisi = 1.0 / np.maximum((share ** 2).sum(axis=1), 1e-12)
        metrics["ilisi"] = float(ilisi.mean())
        metrics["ilisi_scaled"] = float((ilisi.mean() - 1) / (n_batches - 1))
        if labels is not None:
            bl = batch[has_label]
            per_label = []
            for c in np.unique(codes):
                m = codes == c
                if len(np.unique(bl[m])) < 2 or m.sum() <= len(np.unique(bl[m])):
                    continue  # scIB skips labels in one batch (and one cell per batch)
                s = silhouette_samples(x[has_label][m], bl[m], metric="cosine")
                per_label.append(float(np.mean(1 - np.abs(s))))
            if per_label:
                metrics["batch_asw"] = float(np.mean(per_label))
            else:
                skipped["batch_asw"] = "no label is present in two or more samples"
    return {"metrics": metrics, "skipped": skipped, "seconds": round(time.time() - t0, 3)}
