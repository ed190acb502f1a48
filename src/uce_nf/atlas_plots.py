"""The atlas' static pictures and table, named for MultiQC custom content (``*_mqc.png`` images and
``atlas_metrics_mqc.tsv``, found by ``multiqc`` in the folder): UMAPs coloured by sample, species,
label and Leiden cluster (report_map.plot_map draws them), and the label-transfer confusion matrix."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from .io import atomic_path
from .report_map import plot_map


def _write(path: Path, data: bytes | str) -> None:
    with atomic_path(path, suffix=path.suffix) as tmp:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")


def write_plots(out: Path, obs: pd.DataFrame, xy: np.ndarray, label_column: str | None, summary: dict, seed: int,
                max_cells: int) -> list[str]:
    n = len(obs)
    rows = np.arange(n) if n <= max_cells else np.sort(np.random.default_rng([seed, 3]).choice(n, max_cells, replace=False))
    shown = f"{n:,} cells" if len(rows) == n else f"{len(rows):,} of {n:,} cells shown"
    panels = [("sample", "sample"), ("species", "species"), ("label", label_column), ("leiden", "leiden")]
    written = []
    for name, col in panels:
        if col is None:
            continue
        s = SimpleNamespace(name=f"UCE atlas ({shown})")
        png = plot_map(s, xy[rows], ("UMAP1", "UMAP2"), [(col, obs[col].iloc[rows].reset_index(drop=True))], seed)
        fname = f"atlas_umap_{name}_mqc.png"
        _write(out / fname, png)
        written.append(fname)
    lt = summary.get("label_transfer") or {}
    with_truth = {q: r for q, r in (lt.get("queries") or {}).items() if "confusion" in r}
    if with_truth:
        _write(out / "atlas_confusion_mqc.png", confusion_png(with_truth, lt))
        written.append("atlas_confusion_mqc.png")
    _write(out / "atlas_metrics_mqc.tsv", metrics_table(summary))
    written.append("atlas_metrics_mqc.tsv")
    return written


def confusion_png(queries: dict, lt: dict) -> bytes:
    """One heat map per query with truth: rows = true label, columns = transferred label, shaded by the
    row fraction, annotated with counts."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    sizes = [len(r["confusion"]["labels"]) for r in queries.values()]
    side = min(14.0, max(4.0, 0.45 * max(sizes) + 2.5))
    fig, axes = plt.subplots(1, len(queries), figsize=(side * len(queries), side + 1), squeeze=False, dpi=100)
    for ax, (q, r) in zip(axes[0], queries.items()):
        labels, m = r["confusion"]["labels"], np.asarray(r["confusion"]["matrix"], dtype=float)
        frac = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel(f"transferred label (reference: {', '.join(lt['reference_samples'])})", fontsize=9)
        ax.set_ylabel(f"{r.get('truth_column') or lt['label_column']} of {q}", fontsize=9)
        ax.set_title(f"{q}: accuracy {r['accuracy']:.3f} on {r['n_with_truth']:,} cells (k={lt['k']})", fontsize=10)
        if len(labels) <= 25:
            for (i, j), v in np.ndenumerate(m):
                if v:
                    ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=6,
                            color="white" if frac[i, j] > 0.6 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


METRIC_TEXT = {
    "label_asw": "label silhouette, (ASW + 1) / 2; 1 = labels separated",
    "knn_label_consistency": "fraction of the k nearest neighbours with the same label",
    "batch_asw": "scIB batch ASW within labels; 1 = samples mixed",
    "ilisi": "integration LISI (30 neighbours); 1 to the number of samples",
    "ilisi_scaled": "(iLISI - 1) / (samples - 1); 1 = samples mixed",
    "holdout_accuracy": "label transfer: accuracy on the held-out reference cells",
}


def metrics_table(summary: dict) -> str:
    """MultiQC custom content: one row per metric (value, cells it was computed on, meaning)."""
    rows = [(m, v, summary["metrics_cells"], METRIC_TEXT.get(m, "")) for m, v in summary["metrics"].items()]
    rows += [(m, "skipped", "", why) for m, why in summary["metrics_skipped"].items()]
    lt = summary.get("label_transfer")
    if lt:
        if lt.get("holdout_accuracy") is not None:
            rows.append(("holdout_accuracy", lt["holdout_accuracy"], lt["n_holdout"], METRIC_TEXT["holdout_accuracy"]))
        for q, r in lt["queries"].items():
            if "accuracy" in r:
                rows.append((f"accuracy_{q}", r["accuracy"], r["n_with_truth"],
                             f"label transfer: accuracy on query {q} against its own {r.get('truth_column')}"))
    head = [
        "# id: 'uce_atlas_metrics'",
        "# section_name: 'UCE atlas: integration metrics and label transfer'",
        f"# description: 'Atlas of {summary['n_cells']:,} cells from {len(summary['samples'])} sample(s). Metrics on a "
        f"seeded sample of {summary['metrics_cells']:,} cells, cosine distance on X_uce, batch = sample.'",
        "# plot_type: 'table'",
        "# pconfig:",
        "#     id: 'uce_atlas_metrics_table'",
        "#     title: 'UCE atlas metrics'",
        "#     col1_header: 'Metric'",
        "Metric\tvalue\tcells\tmeaning",
    ]
    body = [f"{m}\t{v:.4f}\t{c}\t{t}" if isinstance(v, float) else f"{m}\t{v}\t{c}\t{t}" for m, v, c, t in rows]
    return "\n".join(head + body) + "\n"
