"""Label transfer for `uce atlas`: a kNN classifier in UCE space.

The reference is every labelled, embedded cell of the --reference-sample datasets, capped at
--reference-max-cells by a seeded sample (so memory stays bounded whatever the reference size). A
query cell gets the majority label of its k nearest reference cells (cosine; ties: the label whose
voters are closer in total, then the first label in sorted order) and a confidence, the fraction
of the k neighbours that voted for that label.

Held-out accuracy: a seeded random 20% of the (capped) reference cells are classified by the other
80% (no stratification: label frequencies as in the reference). The cells of the atlas are then
classified by the whole capped reference. A query sample that has the label column too gets its
accuracy (over its cells with a label) and a confusion matrix.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .atlas_knn import knn, vote

HOLDOUT_FRACTION = 0.2


class Reference:
    """The capped reference: its cells' PC-space (or X_uce) rows and label codes."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, k: int, pc_space: bool):
        self.labels = np.array(sorted(set(labels.tolist())), dtype=object)
        self.codes = np.searchsorted(self.labels, labels).astype(np.int64)
        self.x, self.k, self.pc_space = x, k, pc_space

    def predict(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(label codes, confidence) of each query row."""
        idx, dist = knn(query, self.x, self.k, pc_space=self.pc_space)
        return vote(self.codes[idx], dist, len(self.labels))

    def holdout(self, seed: int) -> dict:
        """Accuracy on a seeded 20% of the reference, classified by the remaining 80%."""
        n = len(self.codes)
        if n < 2:
            return {"holdout_accuracy": None, "n_holdout": 0, "n_train": n,
                    "split": "skipped: fewer than 2 reference cells"}
        perm = np.random.default_rng([seed, 1]).permutation(n)
        n_hold = max(1, int(round(HOLDOUT_FRACTION * n)))
        hold, train = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
        idx, dist = knn(self.x[hold], self.x[train], self.k, pc_space=self.pc_space)
        pred, _ = vote(self.codes[train][idx], dist, len(self.labels))
        return {"holdout_accuracy": float(np.mean(pred == self.codes[hold])), "n_holdout": int(n_hold),
                "n_train": int(len(train)),
                "split": f"seeded random {HOLDOUT_FRACTION:.0%} of the reference cells held out (seed {seed}), "
                         "classified by the other cells; not stratified"}


def query_report(truth: pd.Series, predicted: np.ndarray) -> dict:
    """Accuracy and confusion matrix (rows: true label, columns: predicted) over cells with a label."""
    truth = truth.astype(object)
    has = truth.notna().to_numpy()
    out = {"n": int(len(predicted)), "n_with_truth": int(has.sum())}
    if not has.any():
        return out
    t = truth.to_numpy()[has].astype(str)
    p = np.asarray(predicted, dtype=object)[has].astype(str)
    labels = sorted(set(t.tolist()) | set(p.tolist()))
    pos = {lab: i for i, lab in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(m, (np.array([pos[x] for x in t]), np.array([pos[x] for x in p])), 1)
    out.update(accuracy=float(np.mean(t == p)), confusion={"labels": labels, "matrix": m.tolist()})
    return out
