"""`uce report`: one self-contained HTML report over all final outputs, plus MultiQC custom
content and a machine-readable summary.

Reads each ``<sample>_uce_adata.h5ad`` with h5py only: ``obsm['X_uce']`` in row chunks (never the
counts matrix), the obs columns it needs, and the provenance in ``uns['uce']``; or, in the pipeline,
the small summary MERGE wrote of it (report_summary.py), which holds the same numbers. With
``--atlas-dir`` it adds the atlas section (report_atlas.py). Writes into
``--output-dir`` (each file atomically):

``uce_report.html``   header (pipeline version, run date), per-sample tables of cells and genes
                      in/kept/dropped, a per-species table (report_species.py: vocabulary,
                      chromosomes, chromosome token offset, checkpoint, genes matched per dataset),
                      run settings and runtimes, embedding QC (norms, mean
                      pairwise cosine as a collapse detector) and a 2-D map per sample. Inline
                      CSS and base64 PNGs only: no scripts, no external resources.
``uce_mqc.json``      MultiQC custom content (``plot_type: table``), found by ``multiqc <outdir>``;
``uce_species_mqc.json``  the per-species table, as MultiQC custom content too.
``uce_summary.json``  the same numbers, machine-readable.

This module reads and measures (samples, embedding QC, trace) and writes the files; report_html.py
renders the maps, the HTML page and the MultiQC table.

Decisions
---------
Collapse threshold (default 0.95)
    The mean pairwise cosine similarity of a seeded sample of up to 2,000 cells. A collapsed
    model (untrained or corrupted weights, a broken pad mask, every sentence the same) maps all
    cells to nearly the same unit vector: mean cosine >= 0.98 (0.9999 for near-identical rows).
    Transformer embeddings are anisotropic, though: they share a common direction, so even
    embeddings that separate cell types can have a high mean cosine (the demo checkpoint gives
    0.90 on the pbmc demo). 0.95 leaves a margin on both sides: it flags near-identical vectors
    without crying wolf on every anisotropic model. The value is shown for every sample; lower
    ``--collapse-threshold`` for a stricter check, raise it for a very homogeneous sample (one
    sorted cell type).
2-D map
    PCA (default) or UMAP (``--map umap``) of a seeded sample of up to 20,000 cells; see report_map.py.
Colour
    ``--color-by`` (repeatable; one panel each); default: the first categorical obs column
    whose name contains cell_type, celltype, cell_label, bulk_labels, louvain, leiden or cluster
    (in that priority; an exact name beats a longer one such as cell_type_ontology_term_id).
    The 20 most frequent categories get a colour and a legend entry, the rest are grey.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import click
import h5py
import numpy as np
import pandas as pd

from . import __version__
from .io import UserError, atomic_path, handle_errors
from .report_trace import read_trace, summarise_tasks, tasks_of

try:
    from anndata.io import read_elem
except ImportError:  # pragma: no cover
    from anndata.experimental import read_elem

log = logging.getLogger("uce_nf.report")

SUFFIX = "_uce_adata.h5ad"
COLOR_PATTERNS = ("cell_type", "celltype", "cell_label", "bulk_labels", "louvain", "leiden", "cluster")
DEFAULT_COLLAPSE_THRESHOLD = 0.95
COSINE_CELLS = 2000
MAP_CELLS = 20_000
NORM_TOLERANCE = 1e-3
# Below this share of a dataset's genes in its species' vocabulary the embedding rests on few genes:
# how users of new species end up with collapsed embeddings (issue 13; snap-stanford/UCE #64)
MIN_MATCHED_SHARE = 0.30
CHUNK_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------
# Reading one sample
# ---------------------------------------------------------------------------------------------

@dataclass
class Sample:
    name: str
    path: Path
    n_cells: int
    dim: int
    prov: dict
    qc: dict
    obs_kinds: dict
    mtime: float = 0.0  # the h5ad's modification time (the run date in the report)
    map_: dict = field(default_factory=dict)
    png: bytes | None = None
    trace: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    species: dict = field(default_factory=dict)  # the summary's species block (report_species.py), if any

    @property
    def pre(self) -> dict:
        return self.prov.get("preprocess", {}) or {}


def matched_share(pre: dict) -> float | None:
    """Share of a dataset's genes that are in its species' vocabulary (None when not recorded)."""
    g_in, g_emb = pre.get("genes_in"), pre.get("genes_with_embedding")
    return g_emb / g_in if g_in and g_emb is not None else None


def sample_name(path: Path) -> str:
    n = path.name
    for suffix in (SUFFIX, "_uce.h5ad"):  # full / embeddings output mode
        if n.endswith(suffix):
            return n[: -len(suffix)]
    return n.removesuffix(".h5ad")


def _plain(o):
    """uns values (numpy scalars, arrays, bytes) as plain JSON-able Python."""
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return _plain(o.tolist())
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, bytes):
        return o.decode(errors="replace")
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o


def obs_kinds(f: h5py.File) -> dict[str, str]:
    """obs column -> 'categorical' | 'string' | 'numeric' | 'other', from the HDF5 attributes only."""
    if "obs" not in f:
        return {}
    obs = f["obs"]
    order = obs.attrs.get("column-order", [])
    cols = [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(order)]
    kinds = {}
    for c in cols:
        if c not in obs:
            continue
        node = obs[c]
        enc = node.attrs.get("encoding-type", "")
        enc = enc.decode() if isinstance(enc, bytes) else enc
        if enc == "categorical":
            kinds[c] = "categorical"
        elif enc == "string-array":
            kinds[c] = "string"
        elif isinstance(node, h5py.Dataset) and node.dtype.kind == "b":
            kinds[c] = "categorical"
        elif isinstance(node, h5py.Dataset) and node.dtype.kind in "iuf" or enc in ("nullable-integer",):
            kinds[c] = "numeric"
        elif enc in ("nullable-boolean",):
            kinds[c] = "categorical"
        else:
            kinds[c] = "other"
    return kinds


def default_color_column(kinds: dict[str, str]) -> str | None:
    cats = [c for c, k in kinds.items() if k in ("categorical", "string")]
    for pat in COLOR_PATTERNS:
        hits = [c for c in cats if pat in c.lower()]
        if hits:
            return min(hits, key=lambda c: (c.lower() != pat, c.lower().endswith("_id"), len(c), cats.index(c)))
    return None


def scan_embedding(ds: h5py.Dataset, rows: np.ndarray) -> tuple[dict, np.ndarray]:
    """One chunked pass over X_uce: norm statistics over every cell, and the rows `rows` (sorted)."""
    n, d = ds.shape
    step = max(1, CHUNK_BYTES // max(1, d * ds.dtype.itemsize))
    nmin, nmax, nonfinite, off = np.inf, -np.inf, 0, 0
    picked = np.empty((len(rows), d), dtype=np.float32)
    pos = 0
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = np.asarray(ds[start:stop], dtype=np.float32)
        finite = np.isfinite(block).all(axis=1)
        nonfinite += int((~finite).sum())
        if finite.any():
            b = block if finite.all() else block[finite]
            norms = np.sqrt(np.einsum("ij,ij->i", b, b, dtype=np.float64))
            nmin, nmax = min(nmin, float(norms.min())), max(nmax, float(norms.max()))
            off += int((np.abs(norms - 1) > NORM_TOLERANCE).sum())
        hi = np.searchsorted(rows, stop)
        if hi > pos:
            picked[pos:hi] = block[rows[pos:hi] - start]
            pos = hi
        if n > 10 * step:
            log.debug("%s: scanned %d of %d cells", ds.file.filename, stop, n)
    return {"norm_min": nmin if np.isfinite(nmin) else None, "norm_max": nmax if np.isfinite(nmax) else None,
            "non_finite_cells": nonfinite, "off_unit_cells": off}, picked


def mean_pairwise_cosine(x: np.ndarray) -> float | None:
    """Mean cosine over all pairs i != j, in O(n d): (|sum y|^2 - sum |y|^2) / (n (n - 1))."""
    x = x[np.isfinite(x).all(axis=1)].astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    y = x[norms > 0] / norms[norms > 0, None]
    m = len(y)
    if m < 2:
        return None
    s = y.sum(axis=0)
    return float((s @ s - (y * y).sum()) / (m * (m - 1)))


def scan_sample(f: h5py.File, path: Path, *, seed: int, map_cells: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """The numbers of one final h5ad (opened as `f`) that do not depend on report options, the
    embeddings of the seeded map sample, and its (sorted) rows."""
    if "obsm" not in f or "X_uce" not in f["obsm"]:
        raise UserError(f"{path}: no obsm['X_uce']; pass the final <sample>{SUFFIX} written by `uce merge`")
    ds = f["obsm"]["X_uce"]
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 2:
        raise UserError(f"{path}: obsm['X_uce'] is not a dense 2-D matrix; re-run `uce merge`")
    n, d = (int(s) for s in ds.shape)
    if n == 0:
        raise UserError(f"{path}: obsm['X_uce'] has no cells")
    name = sample_name(path)
    prov = {}
    if "uns" in f and "uce" in f["uns"]:
        prov = _plain(read_elem(f["uns"]["uce"]))

    # Embeddings mode keeps the cells the filters dropped as NaN rows (obs['uce_embedded'] False):
    # they are neither sampled nor counted as broken embeddings.
    embedded = (np.asarray(read_elem(f["obs"]["uce_embedded"]), dtype=bool) if "uce_embedded" in f["obs"]
                else np.ones(n, dtype=bool))
    # Nested seeded samples: the cosine cells are the first of the map cells (or the reverse).
    perm = np.flatnonzero(embedded)[np.random.default_rng(seed).permutation(int(embedded.sum()))]
    rows = np.sort(perm[:min(n, max(map_cells, COSINE_CELLS))])
    map_rows = np.sort(perm[:min(n, map_cells)])
    cos_rows = np.sort(perm[:min(n, COSINE_CELLS)])
    log.info("%s: %d cells x %d dims; scanning embedding norms", name, n, d)
    qc, gathered = scan_embedding(ds, rows)
    qc["non_finite_cells"] -= int((~embedded).sum())  # NaN by design, see above
    picked = gathered if len(map_rows) == len(rows) else gathered[np.searchsorted(rows, map_rows)]
    qc["mean_cosine"] = mean_pairwise_cosine(gathered[np.searchsorted(rows, cos_rows)])
    qc["cosine_cells"] = len(cos_rows)
    qc["unit_norm"] = qc["non_finite_cells"] == 0 and qc["off_unit_cells"] == 0
    info = {"name": name, "file": Path(path).name, "mtime": Path(path).stat().st_mtime, "n_cells": n, "dim": d,
            "provenance": prov, "qc": qc, "map_cells": len(map_rows)}
    return _plain(info), picked, map_rows


def sample_from(info: dict, columns: dict[str, pd.Series], *, threshold: float,
                color_by: tuple[str, ...]) -> tuple[Sample, list[tuple[str, pd.Series | None]]]:
    """A report Sample from scan_sample's numbers (or a summary's), with the report's options
    applied: the collapse threshold and the colour columns."""
    qc = dict(info["qc"])
    qc["collapsed"] = qc["mean_cosine"] is not None and qc["mean_cosine"] > threshold
    prov, kinds = info["provenance"], info["obs_kinds"]
    s = Sample(info["name"], Path(info["file"]), info["n_cells"], info["dim"], prov, qc, kinds, mtime=info["mtime"],
               species=info.get("species") or {})
    if not prov:
        s.warnings.append("no uns['uce'] provenance: settings and cell/gene counts unknown")
    share = matched_share(s.pre)
    if share is not None and share < MIN_MATCHED_SHARE:
        g_in, g_emb = s.pre["genes_in"], s.pre["genes_with_embedding"]
        s.warnings.append(f"only {g_emb} of {g_in} genes ({100 * g_emb / g_in:.0f}%) match the vocabulary of species "
                          f"'{s.pre.get('species') or prov.get('species')}' (< {MIN_MATCHED_SHARE:.0%}): embeddings of "
                          "few genes tend to collapse; check the species column and that the genes are symbols")
    if qc["collapsed"]:
        s.warnings.append(f"possible collapse: mean pairwise cosine {qc['mean_cosine']:.3f} > {threshold:g} "
                          "(cells look alike to the model)")
    if qc["non_finite_cells"]:
        s.warnings.append(f"{qc['non_finite_cells']} cells have NaN/inf embeddings")
    if qc["off_unit_cells"]:
        s.warnings.append(f"{qc['off_unit_cells']} cells are not unit norm (|norm - 1| > {NORM_TOLERANCE:g})")

    cols = [c for c in color_by if c in kinds] if color_by else [c for c in [default_color_column(kinds)] if c]
    missing = [c for c in color_by if c not in kinds]
    if missing:
        s.warnings.append(f"--color-by column(s) not in obs: {', '.join(missing)}")
    unreadable = [c for c in cols if c not in columns]
    if unreadable:
        s.warnings.append(f"--color-by column(s) of an unsupported obs type: {', '.join(unreadable)}")
    colors = [(c, columns[c]) for c in cols if c in columns] or [("", None)]
    s.map_ = {"cells": info["map_cells"], "color_by": [c for c in cols if c in columns], "missing_color_by": missing,
              "color_by_auto": not color_by}
    return s, colors


# ---------------------------------------------------------------------------------------------
# Summary and writing
# ---------------------------------------------------------------------------------------------

def summary(samples: list[Sample], *, threshold: float, map_method: str, seed: int, trace: dict | None,
            generated: dt.datetime, species: list[dict]) -> dict:
    return {
        "uce_nf_version": __version__, "generated": generated.isoformat(timespec="seconds"),
        "collapse_threshold": threshold, "map_method": map_method, "seed": seed,
        "samples": {s.name: {
            "file": s.path.name, "cells": s.n_cells, "dim": s.dim,
            "species": s.prov.get("species") or s.pre.get("species"),
            "preprocess": s.pre, "provenance": {k: v for k, v in s.prov.items() if k != "preprocess"},
            "qc": s.qc, "map": s.map_, "trace": s.trace or None, "warnings": s.warnings,
        } for s in samples},
        "species": species,
        "trace": trace,
    }


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------

def build_report(adatas: list[Path], output_dir: Path, *, summaries: list[Path] = (), atlas_dir: Path | None = None,
                 color_by: tuple[str, ...] = (), collapse_threshold: float = DEFAULT_COLLAPSE_THRESHOLD,
                 trace_path: Path | None = None, map_method: str = "pca", seed: int = 0,
                 map_cells: int = MAP_CELLS) -> dict:
    """The report over final h5ads (`adatas`, summarised here) and/or MERGE's summaries (the
    pipeline's route: <id>.summary.json with its .npz), plus the atlas section when `atlas_dir`
    (ATLAS's output folder) is given."""
    from .report_atlas import read_atlas
    from .report_html import multiqc_content, render_html  # they import this module
    from .report_map import plot_map, project
    from .report_species import species_multiqc, species_rows
    from .report_summary import read_summary, summarise
    if not adatas and not summaries:
        raise UserError("nothing to report: pass --adata <sample>_uce_adata.h5ad or --summary <sample>.summary.json")
    atlas = read_atlas(Path(atlas_dir)) if atlas_dir else None
    tasks = read_trace(trace_path) if trace_path else None
    loaded = [summarise(Path(p), seed=seed, map_cells=map_cells) for p in adatas]
    loaded += [read_summary(Path(p)) for p in summaries]
    names = [info["name"] for info, *_ in loaded]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"sample name(s) {', '.join(dup)} given more than once (name = file name minus {SUFFIX}); "
                        "pass each sample's file once")
    samples = []
    for info, pcs, ratio, columns in loaded:
        s, colors = sample_from(info, columns, threshold=collapse_threshold, color_by=tuple(color_by))
        y, labels, used = project(pcs, ratio, map_method, seed, s.name)
        s.map_["method"] = used
        s.png = plot_map(s, y, labels, colors, seed)
        if tasks is not None:
            s.trace = summarise_tasks(tasks_of(s.name, tasks))
        for w in s.warnings:
            log.warning("%s: %s", s.name, w)
        samples.append(s)
    trace = summarise_tasks(tasks) if tasks is not None else None
    generated = dt.datetime.now(dt.timezone.utc)
    output_dir.mkdir(parents=True, exist_ok=True)
    species = species_rows(samples)
    summ = summary(samples, threshold=collapse_threshold, map_method=map_method, seed=seed, trace=trace,
                   generated=generated, species=species)
    if atlas is not None:
        summ["atlas"] = atlas.summary
    _write_text(output_dir / "uce_summary.json", json.dumps(_plain(summ), indent=2) + "\n")
    _write_text(output_dir / "uce_mqc.json", json.dumps(_plain(multiqc_content(samples, collapse_threshold)), indent=2) + "\n")
    _write_text(output_dir / "uce_species_mqc.json", json.dumps(_plain(species_multiqc(species)), indent=2) + "\n")
    _write_text(output_dir / "uce_report.html", render_html(samples, threshold=collapse_threshold, map_method=map_method,
                                                           trace=trace, trace_path=trace_path, generated=generated,
                                                           atlas=atlas, species=species))
    log.info("wrote uce_report.html, uce_mqc.json, uce_species_mqc.json and uce_summary.json to %s", output_dir)
    return summ


@click.command("report", context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--adata", "adatas", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help=f"Final <sample>{SUFFIX} (repeat for each sample).")
@click.option("--summary", "summaries", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="<sample>.summary.json written by `uce merge --summary` (its .npz beside it), instead of the h5ad "
                   "(repeat for each sample; the pipeline's route).")
@click.option("--atlas-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Output folder of `uce atlas` (atlas_summary.json and maps): adds the atlas section.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for uce_report.html, uce_mqc.json and uce_summary.json.")
@click.option("--color-by", multiple=True,
              help="obs column to colour the maps by (repeatable: one panel each). Default: the first cell-type-like "
                   "categorical column (cell_type, celltype, cell_label, bulk_labels, louvain, leiden, cluster).")
@click.option("--collapse-threshold", type=click.FloatRange(-1, 1), default=DEFAULT_COLLAPSE_THRESHOLD,
              help="Flag a sample whose mean pairwise cosine (up to 2,000 sampled cells) is above this.")
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Nextflow trace file (pipeline_info/execution_trace_*.txt): per-process realtime.")
@click.option("--map", "map_method", type=click.Choice(["pca", "umap"]), default="pca",
              help="2-D map: pca (seconds) or umap (umap-learn; minutes on large samples, falls back to PCA).")
@click.option("--max-map-cells", type=click.IntRange(2), default=MAP_CELLS, help="Cells sampled for each map.")
@click.option("--seed", type=int, default=0, help="Seed of the cell samples (cosine, map).")
@handle_errors
def report_command(adatas, summaries, atlas_dir, output_dir, color_by, collapse_threshold, trace_path, map_method,
                   max_map_cells, seed):
    """One HTML report over all samples (+ MultiQC custom content and a JSON summary)."""
    build_report(list(adatas), output_dir, summaries=list(summaries), atlas_dir=atlas_dir, color_by=tuple(color_by),
                 collapse_threshold=collapse_threshold,
                 trace_path=trace_path, map_method=map_method, seed=seed, map_cells=max_map_cells)
