"""`uce atlas`: every embedded cell of every dataset in one AnnData, with a UMAP, Leiden clusters,
optional kNN label transfer and integration metrics (issue 14).

Streaming (memory does not grow with the number of cells beyond obs and a few numbers per cell):
1. One pass over the datasets copies X_uce, row block by row block, into the output file, and keeps
   in memory only the seeded samples it needs: the fit sample (--umap-max-cells), the metrics sample
   (--metrics-max-cells, nested in the same permutation) and the capped reference
   (--reference-max-cells).
2. On the fit sample: PCA (--n-pcs; 0 = none), the exact 15-nearest-neighbour graph (cosine),
   scanpy's UMAP connectivities, ``sc.tl.umap`` and ``sc.tl.leiden`` (igraph flavour), all seeded.
   When the atlas has at most --umap-max-cells cells the fit sample is every cell.
3. A second pass over the written X_uce projects the other cells, a block at a time: each gets the
   similarity-weighted mean UMAP position of its 15 nearest fit cells and their majority Leiden
   cluster (a kNN transform, not umap-learn's optimising ``transform``: exact, seeded-free and
   cheap); and, with label transfer, the kNN label from the reference (label_transfer.py).
Same inputs and seed give the same file content.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click
import h5py
import numpy as np
import pandas as pd

from .atlas_inputs import Input, choose_columns, open_inputs, read_obs
from .atlas_knn import Space, knn, vote, weighted_mean
from .io import UserError, atomic_path, handle_errors, write_json
from .output import CHUNK_BYTES, _block_rows, _create_x_uce, _h5_safe

try:
    from anndata.io import write_elem
except ImportError:  # pragma: no cover
    from anndata.experimental import write_elem

log = logging.getLogger("uce_nf.atlas")

GRAPH_NEIGHBOURS = 15  # scanpy's n_neighbors default, for the UMAP/Leiden graph and the projection
MIN_CELLS = 10


class Settings:
    def __init__(self, k=15, seed=0, umap_max_cells=50_000, metrics_max_cells=20_000, reference_max_cells=50_000,
                 n_pcs=50, resolution=1.0, plot_max_cells=200_000):
        self.k, self.seed, self.umap_max_cells, self.metrics_max_cells = k, seed, umap_max_cells, metrics_max_cells
        self.reference_max_cells, self.n_pcs, self.resolution = reference_max_cells, n_pcs, resolution
        self.plot_max_cells = plot_max_cells


def _sample(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    return rows if len(rows) <= cap else np.sort(rng.choice(rows, cap, replace=False))


def copy_embeddings(inputs: list[Input], ds: h5py.Dataset, need: np.ndarray) -> np.ndarray:
    """Stream every embedded row into ds (atlas order) and return the rows `need` (sorted atlas rows)."""
    dim = ds.shape[1]
    got = np.empty((len(need), dim), dtype=np.float32)
    pos, j = 0, 0
    step = _block_rows(dim)
    for i in inputs:
        with h5py.File(i.path, "r") as f:
            src = f["obsm"]["X_uce"]
            for lo in range(0, i.n_rows, step):
                sel = i.embedded[lo:lo + step]
                if not sel.any():
                    continue
                b = np.asarray(src[lo:lo + step], dtype=np.float32)[sel]
                if not np.isfinite(b).all():
                    r = lo + int(np.flatnonzero(sel)[np.flatnonzero(~np.isfinite(b).all(axis=1))[0]])
                    raise UserError(f"{i.path} (sample {i.sample}): X_uce row {r} is not finite although the cell "
                                    "counts as embedded; re-run its MERGE")
                ds[pos:pos + len(b)] = b
                hi = int(np.searchsorted(need, pos + len(b)))
                got[j:hi] = b[need[j:hi] - pos]
                pos, j = pos + len(b), hi
        log.info("copied %s: %d cells", i.sample, i.n_cells)
    return got


def fit_map(x: np.ndarray, seed: int, resolution: float, pc_space: bool) -> tuple[np.ndarray, pd.Categorical, dict]:
    """UMAP coordinates and Leiden clusters of the fit sample (its neighbour space rows x)."""
    import anndata as ad
    import scanpy as sc
    from scanpy.neighbors._common import _get_sparse_matrix_from_indices_distances
    from scanpy.neighbors._connectivity import umap as connectivities
    t0 = time.time()
    n = len(x)
    k = min(GRAPH_NEIGHBOURS, n)
    idx, dist = knn(x, x, k, self_index=np.arange(n), pc_space=pc_space)
    t_knn = time.time() - t0
    a = ad.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(n).astype(str)))
    a.obsm["X_nb"] = x
    a.obsp["distances"] = _get_sparse_matrix_from_indices_distances(idx, dist, keep_self=False)
    a.obsp["connectivities"] = connectivities(idx, dist, n_obs=n, n_neighbors=k)
    a.uns["neighbors"] = {"connectivities_key": "connectivities", "distances_key": "distances",
                          "params": {"n_neighbors": k, "method": "umap", "random_state": seed, "metric": "cosine",
                                     "use_rep": "X_nb"}}
    graph_bytes = sum(int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)
                      for m in (a.obsp["distances"], a.obsp["connectivities"])) + idx.nbytes + dist.nbytes
    t1 = time.time()
    sc.tl.umap(a, random_state=seed)
    t2 = time.time()
    sc.tl.leiden(a, flavor="igraph", n_iterations=2, directed=False, random_state=seed, resolution=resolution)
    t3 = time.time()
    info = {"neighbours": k, "graph_seconds": round(t_knn, 3), "graph_bytes": graph_bytes,
            "umap_seconds": round(t2 - t1, 3), "leiden_seconds": round(t3 - t2, 3)}
    return np.asarray(a.obsm["X_umap"], dtype=np.float32), a.obs["leiden"].values, info


def build_atlas(adatas, samples, species, output_dir: Path, *, obs_columns=(), references=(), label_column=None,
                query_label_column=None, settings: Settings | None = None) -> dict:
    from .atlas_metrics import integration_metrics
    from .atlas_plots import write_plots
    from .label_transfer import Reference, query_report
    st = settings or Settings()
    t_start = time.time()
    timings = {}
    references = list(dict.fromkeys(references))
    inputs = open_inputs(list(adatas), list(samples), list(species))
    columns, label_column, notes = choose_columns(inputs, list(obs_columns), label_column, references)
    if query_label_column:
        if not references:
            raise UserError("--query-label-column needs --reference-sample (it holds the queries' true labels)")
        if not any(query_label_column in i.kinds for i in inputs if i.sample not in references):
            raise UserError(f"--query-label-column {query_label_column}: in no query dataset's obs; check the name")
        if query_label_column not in columns:
            columns.append(query_label_column)
    n = sum(i.n_cells for i in inputs)
    if n < MIN_CELLS:
        raise UserError(f"the datasets hold {n} embedded cells together; an atlas needs at least {MIN_CELLS}")
    dim = inputs[0].dim
    obs = read_obs(inputs, columns)
    labels = obs[label_column] if label_column else None
    is_ref = obs["sample"].isin(references).to_numpy()
    if references:
        ref_pool = np.flatnonzero(is_ref & labels.notna().to_numpy())
        if len(ref_pool) == 0:
            raise UserError(f"--label-column {label_column}: no reference cell has a label (samples "
                            f"{', '.join(references)}); pick the column that holds the cell types")
    timings["read_obs"] = round(time.time() - t_start, 3)

    perm = np.random.default_rng(st.seed).permutation(n)
    fit_rows = np.arange(n) if n <= st.umap_max_cells else np.sort(perm[:st.umap_max_cells])
    met_rows = np.sort(perm[:min(n, st.metrics_max_cells)])
    ref_rows = _sample(ref_pool, st.reference_max_cells, np.random.default_rng([st.seed, 2])) if references \
        else np.zeros(0, dtype=np.int64)
    need = np.union1d(np.union1d(fit_rows, met_rows), ref_rows)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {"n_cells": n, "dim": dim, "seed": st.seed,
               "samples": {i.sample: {"species": i.species, "n_cells": i.n_cells, "file": i.path.name,
                                      "rows_in_file": i.n_rows} for i in inputs},
               "obs_columns": columns, "label_column": label_column, **notes}

    with atomic_path(output_dir / "uce_atlas.h5ad", suffix=".h5ad") as tmp, \
            h5py.File(tmp, "w", rdcc_nbytes=4 * CHUNK_BYTES) as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        ds = _create_x_uce(f, n, dim)
        t0 = time.time()
        got = copy_embeddings(inputs, ds, need)
        timings["copy_x_uce"] = round(time.time() - t0, 3)

        t0 = time.time()
        fit_pos = np.searchsorted(need, fit_rows)
        space = Space(got, fit_pos, st.n_pcs)
        pc = space.dims is not None
        fit_p = space(got, fit_pos)
        timings["pca"] = round(time.time() - t0, 3)
        log.info("UMAP and Leiden on %d of %d cells", len(fit_rows), n)
        fit_umap, fit_leiden, graph = fit_map(fit_p, st.seed, st.resolution, pc)
        timings.update(graph=graph["graph_seconds"], umap=graph["umap_seconds"], leiden=graph["leiden_seconds"])
        summary["neighbour_space"] = {"n_pcs": space.dims, "variance_ratio": round(space.variance_ratio, 6),
                                      "distance": "cosine (1 - cos)" + (", as |dPC|^2 / 2" if pc else "")}

        # label transfer: the reference's holdout first, then every non-reference cell in pass 2
        ref = None
        if references:
            t0 = time.time()
            ref = Reference(space(got, np.searchsorted(need, ref_rows)), labels.to_numpy()[ref_rows].astype(str),
                            st.k, pc)
            lt = {"reference_samples": references, "k": st.k, "label_column": label_column,
                  "reference_cells": int(len(ref_pool)), "reference_cells_used": int(len(ref_rows)),
                  "reference_labels": ref.labels.tolist(), **ref.holdout(st.seed)}
            timings["label_transfer_holdout"] = round(time.time() - t0, 3)

        umap_xy = np.empty((n, 2), dtype=np.float32)
        leiden = np.empty(n, dtype=np.int64)
        umap_xy[fit_rows] = fit_umap
        leiden[fit_rows] = fit_leiden.codes
        pred = np.full(n, -1, dtype=np.int64)
        conf = np.full(n, np.nan, dtype=np.float32)
        in_fit = np.zeros(n, dtype=bool)
        in_fit[fit_rows] = True
        t0 = time.time()
        if not in_fit.all() or ref is not None:
            step = max(1024, _block_rows(dim) // 2)
            for s in range(0, n, step):
                e = min(n, s + step)
                p = space(ds[s:e])
                rest = np.flatnonzero(~in_fit[s:e])
                if len(rest):
                    idx, dist = knn(p[rest], fit_p, GRAPH_NEIGHBOURS, pc_space=pc)
                    umap_xy[s + rest] = weighted_mean(fit_umap, idx, dist)
                    leiden[s + rest] = vote(fit_leiden.codes[idx], dist, len(fit_leiden.categories))[0]
                q = np.flatnonzero(~is_ref[s:e])
                if ref is not None and len(q):
                    pred[s + q], conf[s + q] = ref.predict(p[q])
                if n > 20 * step:
                    log.debug("projected %d of %d cells", e, n)
        timings["project"] = round(time.time() - t0, 3)
        summary["umap"] = {"cells_fit": int(len(fit_rows)), "cells_projected": int(n - len(fit_rows)),
                           "max_cells": st.umap_max_cells, "seconds": round(graph["umap_seconds"], 3),
                           "projection_seconds": timings["project"],
                           "projection": "similarity-weighted mean of the 15 nearest fit cells' UMAP positions"}
        summary["leiden"] = {"resolution": st.resolution, "flavor": "igraph", "n_iterations": 2,
                             "clusters": len(fit_leiden.categories), "cells_fit": int(len(fit_rows)),
                             "seconds": graph["leiden_seconds"],
                             "projection": "majority cluster of the 15 nearest fit cells"}
        summary["neighbour_graph"] = {"cells": int(len(fit_rows)), "neighbours": graph["neighbours"],
                                      "bytes": graph["graph_bytes"], "seconds": graph["graph_seconds"]}
        obs["leiden"] = pd.Categorical.from_codes(leiden, categories=fit_leiden.categories)
        if ref is not None:
            obs["uce_label_transfer"] = pd.Categorical.from_codes(pred, categories=ref.labels.tolist())
            obs["uce_label_transfer_confidence"] = conf
            lt["queries"] = {}
            for i in inputs:
                if i.sample in references:
                    continue
                m = (obs["sample"] == i.sample).to_numpy()
                col = next((c for c in (query_label_column, label_column) if c and c in i.kinds), None)
                truth = obs[col][m] if col else pd.Series([None] * int(m.sum()))
                lt["queries"][i.sample] = {**query_report(truth, obs["uce_label_transfer"].to_numpy()[m]),
                                           "truth_column": col,
                                           "mean_confidence": float(np.mean(conf[m]))}
            summary["label_transfer"] = lt

        t0 = time.time()
        mx = got[np.searchsorted(need, met_rows)]
        batch = obs["sample"].cat.codes.to_numpy()[met_rows] if len(inputs) > 1 else None
        met = integration_metrics(mx, batch, labels.to_numpy()[met_rows] if labels is not None else None, st.k)
        del got, mx
        summary.update(metrics=met["metrics"], metrics_skipped=met["skipped"], metrics_cells=int(len(met_rows)),
                       metrics_max_cells=st.metrics_max_cells, metrics_seconds=met["seconds"],
                       metrics_k=st.k, metrics_batch="sample")
        timings["metrics"] = round(time.time() - t0, 3)

        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=pd.Index([], dtype=object)))
        write_elem(f["obsm"], "X_umap", umap_xy)
        for key in ("uns", "layers", "varm", "obsp", "varp"):
            write_elem(f, key, {})
        write_elem(f["uns"], "uce_atlas", _h5_safe({
            "samples": [i.sample for i in inputs], "species": [i.species for i in inputs], "seed": st.seed,
            "k": st.k, "umap_max_cells": st.umap_max_cells, "n_pcs": st.n_pcs, "label_column": label_column,
            "reference_samples": references, "leiden_resolution": st.resolution}))

    t0 = time.time()
    summary["plots"] = write_plots(output_dir, obs, umap_xy, label_column, summary, st.seed, st.plot_max_cells)
    timings["plots"] = round(time.time() - t0, 3)
    timings["total"] = round(time.time() - t_start, 3)
    summary["timings"] = timings
    write_json(output_dir / "atlas_summary.json", summary)
    log.info("wrote the atlas of %d cells to %s (%.1f s)", n, output_dir, timings["total"])
    return summary


@click.command("atlas", context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--adata", "adatas", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="A MERGE output (<id>_uce_adata.h5ad or <id>_uce.h5ad); repeat per dataset, samplesheet order.",
              multiple=True)
@click.option("--sample", "samples", required=True, help="Sample id of each --adata (same order).", multiple=True)
@click.option("--species", "species", required=True, help="Species of each --adata (same order).", multiple=True)
@click.option("--obs-column", "obs_columns", help="obs column to carry (repeatable). Default: every cell-type-like "
              "categorical column (cell_type, celltype, cell_label, bulk_labels, louvain, leiden, cluster).", multiple=True)
@click.option("--reference-sample", "references", help="Sample whose labels are transferred (repeatable); "
              "turns label transfer on.", multiple=True)
@click.option("--label-column", default=None, help="obs column with the labels (transfer, metrics, label map). "
              "Default: the first cell-type-like column of the references (or of any dataset).")
@click.option("--query-label-column", default=None, help="obs column with the true labels of the queries, when it "
              "is not --label-column (e.g. cell_type in the query, bulk_labels in the reference): for their accuracy.")
@click.option("--k", type=click.IntRange(1), default=15, help="Neighbours of the label-transfer classifier and of "
              "the kNN label consistency.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Seed of every sample, UMAP and Leiden.")
@click.option("--umap-max-cells", type=click.IntRange(MIN_CELLS), default=50_000,
              help="Above this many cells, UMAP/Leiden are fitted on a seeded sample and the rest projected.")
@click.option("--metrics-max-cells", type=click.IntRange(MIN_CELLS), default=20_000,
              help="Seeded sample of cells for the integration metrics.")
@click.option("--reference-max-cells", type=click.IntRange(1), default=50_000,
              help="Seeded cap on the labelled reference cells of the kNN classifier.")
@click.option("--n-pcs", type=click.IntRange(0), default=50,
              help="Neighbour search on the top PCs of X_uce (fitted on the UMAP sample); 0: on X_uce itself.")
@click.option("--leiden-resolution", type=click.FloatRange(0, min_open=True), default=1.0)
@click.option("--plot-max-cells", type=click.IntRange(MIN_CELLS), default=200_000,
              help="Seeded sample of cells drawn in the PNG maps.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for uce_atlas.h5ad, atlas_summary.json, the *_mqc.png maps and atlas_metrics_mqc.tsv.")
@handle_errors
def atlas_command(adatas, samples, species, obs_columns, references, label_column, query_label_column, k, seed,
                  umap_max_cells, metrics_max_cells, reference_max_cells, n_pcs, leiden_resolution, plot_max_cells,
                  output_dir):
    """One atlas of all datasets: joint X_uce, UMAP, Leiden, kNN label transfer, integration metrics."""
    build_atlas(adatas, samples, species, output_dir, obs_columns=obs_columns, references=references,
                label_column=label_column, query_label_column=query_label_column,
                settings=Settings(k, seed, umap_max_cells, metrics_max_cells, reference_max_cells, n_pcs,
                                  leiden_resolution, plot_max_cells))
