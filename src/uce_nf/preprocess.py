"""Preprocessing (uce-reference.md §4), on sparse row chunks, never densifying the matrix.

Same semantics as the reference by default:
1. genes expressed (count > 0) in >= min_cells cells are kept (over all cells);
2. then cells with >= min_genes expressed genes among those are kept;
3. then genes are cut to those with a protein embedding, matched case-insensitively, in var order,
   duplicates kept.
Unlike the reference, cells left with zero counts over the embedded genes are dropped and counted
(the reference crashes on them with "probabilities contain NaN"); dropping them does not change any
other cell (§15). Counts are found in X, raw or a layer; gene symbols in var_names or a var column.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import re
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from .io import CSRWriter, H5Matrix, UserError, atomic_path, open_h5ad
from .preprocess_shards import (count_range, cpu_seconds, filter_chunk, filter_range, is_counts, nonfinite, ordered_map,
                                 row_ranges, write_kept_parallel)

try:  # anndata >= 0.11
    from anndata.io import read_elem, write_elem
except ImportError:  # pragma: no cover
    from anndata.experimental import read_elem, write_elem

log = logging.getLogger(__name__)
# Ensembl gene ids, with or without a version suffix (ENSG00000141510.17, GENCODE's ..._PAR_Y)
ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?(_PAR_Y)?$")
ENSEMBL_VERSION = re.compile(r"\.\d+(?=(_PAR_Y)?$)")
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "gene_name", "gene_names", "symbol")
COUNT_LAYERS = ("counts", "raw_counts", "count", "umi_counts")


@dataclass
class FilterSettings:
    filter: bool = True
    min_cells: int = 10
    min_genes: int = 25
    min_matched_genes: int = 100


def cell_label(f, row: int) -> str:
    """'cell <row> '<obs name>'' for messages; the row alone if obs cannot be read cheaply."""
    try:
        obs = f["obs"]
        key = obs.attrs.get("_index", "_index")
        name = obs[key.decode() if isinstance(key, bytes) else key][row]
        return f"cell {row} '{name.decode() if isinstance(name, bytes) else name}'"
    except Exception:  # only decorates a message: never hide the real error behind this one
        return f"cell {row}"


def value_problem(f, key: str, m, start: int = 0, scope: str = "") -> str | None:
    """What makes a CSR block not raw counts, in words (None if it is counts). NaN/inf are named as
    such, with how many and the first cell: they are a broken file, not normalised data."""
    n_bad, first = nonfinite(m)
    if n_bad:
        return f"{key} has {n_bad} NaN/inf values{scope}, the first in {cell_label(f, start + first)}"
    if not is_counts(m):
        return f"{key} has negative or non-integer values{scope} (e.g. normalised or log data)"
    return None


def filter_fix(setting: str, to: str = "") -> str:
    """How to relax one filter setting, spelled for the pipeline and for the `uce` command."""
    return (f"lower {setting}{to} (pipeline --{setting}, uce --{setting.replace('_', '-')}) or turn the filter "
            "off (pipeline --filter false, uce --no-filter)")


def too_few_cells(path, n_cells: int, min_cells: int) -> str:
    """The message for a file with fewer cells than min_cells: the gene filter then removes every gene."""
    return (f"{path}: {n_cells} cells but min_cells={min_cells}: the gene filter keeps genes expressed in >= "
            f"min_cells cells, so it removes every gene; {filter_fix('min_cells', f' to at most {n_cells}')}")


def find_counts(f, path: Path, counts_layer: str | None, sample_rows: int = 2000) -> tuple[str, str]:
    """Return (matrix key, var key) of the raw counts: X, raw/X or layers/<name>; auto-detected when
    counts_layer is None. Detection looks at the first rows; every row is checked later while streaming."""
    def candidate(name):
        if name == "X":
            return ("X", "var") if "X" in f else None
        if name == "raw":
            return ("raw/X", "raw/var") if "raw" in f and "X" in f["raw"] else None
        return (f"layers/{name}", "var") if "layers" in f and name in f["layers"] else None

    layers = sorted(f["layers"].keys()) if "layers" in f else []

    def problem(key):
        m = H5Matrix(f[key])
        n = min(sample_rows, m.shape[0])
        return value_problem(f, key, m.rows(0, n), scope=f" in its first {n} cells" if n < m.shape[0] else "")

    if counts_layer:
        c = candidate(counts_layer)
        if c is None:
            raise UserError(f"{path}: counts_layer '{counts_layer}' not found; available: X"
                            f"{', raw' if 'raw' in f else ''}{''.join(', ' + n for n in layers)}")
        p = problem(c[0])
        if p:
            raise UserError(f"{path}: counts_layer '{counts_layer}': {p}; UCE needs raw counts (finite, "
                            "non-negative integers): fix the file or set counts_layer to the layer that holds them")
        return c
    found = []
    for name in ["X", "raw", *[n for n in COUNT_LAYERS if n in layers]]:
        c = candidate(name)
        if c is None:
            continue
        p = problem(c[0])
        if p is None:
            if name != "X":
                log.warning("%s: X does not hold raw counts; using %s (set counts_layer to choose)", path, name)
            return c
        found.append(p)
    what = "; ".join(found) if any("NaN" in p for p in found) else f"no raw counts found ({'; '.join(found) or 'no X'})"
    raise UserError(f"{path}: {what}; UCE needs raw counts (finite, non-negative integers): fix the file or set "
                    "counts_layer to the layer that holds them")


def ensembl_fraction(names) -> float:
    """Share of the first 2000 names that are Ensembl gene ids (version suffixes accepted)."""
    return float(np.mean([bool(ENSEMBL.match(str(n))) for n in names[:2000]])) if len(names) else 0.0


def strip_versions(names: np.ndarray, path: Path) -> np.ndarray:
    """Ensembl ids lose their version suffix (ENSG00000141510.17 -> ENSG00000141510) before the
    lookup: vocabularies that hold Ensembl ids (genes without a symbol) hold them unversioned.
    Symbols never match the pattern, so they pass unchanged."""
    out = np.array([ENSEMBL_VERSION.sub("", n) if ENSEMBL.match(n) else n for n in names.astype(str)], dtype=object)
    n = int(np.sum(out != names.astype(str).astype(object)))
    if n:
        log.info("%s: stripped the version suffix of %d Ensembl ids before the symbol lookup", path, n)
    return out


def gene_symbols(var: pd.DataFrame, path: Path, gene_column: str | None) -> tuple[np.ndarray, str]:
    """Gene symbols for each var row, and where they came from."""
    if gene_column:
        if gene_column not in var.columns:
            raise UserError(f"{path}: gene_column '{gene_column}' is not a var column; available: "
                            f"{', '.join(map(str, var.columns)) or '(none)'}")
        return strip_versions(var[gene_column].astype(str).to_numpy(), path), gene_column
    names = var.index.astype(str)
    if ensembl_fraction(names) < 0.5:
        return strip_versions(names.to_numpy(), path), "var_names"
    for col in SYMBOL_COLUMNS:
        if col in var.columns:
            log.warning("%s: var_names are Ensembl ids; using gene symbols from var['%s']", path, col)
            return strip_versions(var[col].astype(str).to_numpy(), path), col
    raise UserError(f"{path}: var_names are Ensembl ids and no gene symbol column was found (looked for "
                    f"{', '.join(SYMBOL_COLUMNS)}); set gene_column to the var column holding gene symbols")


def preprocess(input_path: Path, species_file: dict, settings: FilterSettings, output: Path, *,
               gene_column: str | None = None, counts_layer: str | None = None, chunk: int = 8192,
               workers: int = 1) -> dict:
    """Write the processed AnnData (CSR counts, reference layout) to `output`; return what was kept.
    Two streaming passes over the rows: gene counts, then cell filters + writing the kept rows.
    With workers > 1 (an .h5ad input with row access) the passes run over row ranges in worker
    processes (preprocess_shards.py); the file written holds the same arrays."""
    t0 = time.time()
    input_path = Path(input_path)
    with open_h5ad(input_path) as f, contextlib.ExitStack() as stack:
        x_key, var_key = find_counts(f, input_path, counts_layer)
        X = H5Matrix(f[x_key])
        var = read_elem(f[var_key])
        symbols, symbol_source = gene_symbols(var, input_path, gene_column)
        n_obs, n_var = X.shape
        if n_obs == 0 or n_var == 0:
            raise UserError(f"{input_path}: the matrix is empty ({n_obs} cells x {n_var} genes)")
        pool = stack.enter_context(shard_pool(input_path, X, workers, chunk))
        if pool:
            ranges = row_ranges(n_obs, workers, chunk)
            path, window = str(input_path), workers + 2  # finished ranges waiting in the parent stay few

        # Pass 1: cells expressing each gene (and a full check that every value is a count). Once a
        # NaN/inf is seen the pass only counts them, so the message says how many there are in all.
        if pool:
            n_cells, n_nonfinite, first_nonfinite = count_parallel(pool, window, path, x_key, ranges, chunk, n_var,
                                                                   input_path)
        else:
            n_cells = np.zeros(n_var, dtype=np.int64)
            n_nonfinite, first_nonfinite = 0, -1
            for start, m in X.iter_rows(chunk):
                n_bad, first = nonfinite(m)
                if n_bad and not n_nonfinite:
                    first_nonfinite = start + first
                n_nonfinite += n_bad
                if n_nonfinite:
                    continue
                if not is_counts(m):
                    raise UserError(f"{input_path}: {x_key} has negative or non-integer values in cells "
                                    f"{start}-{start + m.shape[0] - 1}; UCE needs raw counts: set counts_layer")
                n_cells += np.bincount(m.indices[m.data > 0], minlength=n_var)
        if n_nonfinite:
            raise UserError(f"{input_path}: {x_key} has {n_nonfinite} NaN/inf values, the first in "
                            f"{cell_label(f, first_nonfinite)}; UCE needs raw counts (finite, non-negative "
                            "integers): fix the file or set counts_layer to the layer that holds them")
        if settings.filter and n_obs < settings.min_cells:
            raise UserError(too_few_cells(input_path, n_obs, settings.min_cells))
        gene_ok = n_cells >= settings.min_cells if settings.filter else np.ones(n_var, bool)

        # Genes with embeddings (case-insensitive) that also have a chromosome position.
        usable = {s.lower() for s, ok in zip(species_file["symbols"], species_file["in_chrom_csv"].numpy()) if ok}
        has_emb = np.array([s.lower() in usable for s in symbols], dtype=bool)
        genes = np.flatnonzero(gene_ok & has_emb)
        if len(genes) < settings.min_matched_genes and has_emb.sum() >= settings.min_matched_genes:
            # the symbols match: it is the min_cells filter that removed the genes
            raise UserError(f"{input_path}: the min_cells filter left {len(genes)} of the {int(has_emb.sum())} genes "
                            f"that match {species_file['species']} (kept: genes expressed in >= "
                            f"min_cells={settings.min_cells} of the {n_obs} cells; need >= "
                            f"{settings.min_matched_genes}); {filter_fix('min_cells')}")
        if len(genes) < settings.min_matched_genes:
            raise UserError(f"{input_path}: only {int(has_emb.sum())} of {n_var} genes match {species_file['species']} "
                            f"gene symbols ({len(genes)} after min_cells); check the species, or set gene_column "
                            f"to the var column with symbols (need >= {settings.min_matched_genes})")

        # Pass 2: cells with enough expressed genes (over all kept genes, as the reference), minus cells
        # with zero counts over the embedded genes (the reference would crash on them); kept rows are
        # written as they come.
        gene_ok_idx = np.flatnonzero(gene_ok)
        if pool:
            # the settings travel as a plain namespace: unpickling FilterSettings would import this module
            # (anndata, torch) into every worker
            fs = SimpleNamespace(filter=settings.filter, min_genes=settings.min_genes)
            parts = list(ordered_map(pool, filter_range, [(path, x_key, lo, hi, chunk, gene_ok_idx, genes, fs)
                                                          for lo, hi in ranges], window))
            n_genes, keep, zero, row_nnz = (np.concatenate([p[i] for p in parts]) for i in range(4))
            n_genes = n_genes.astype(np.int64)
            del parts
        else:
            n_genes = np.zeros(n_obs, dtype=np.int64)
            keep = np.zeros(n_obs, dtype=bool)
            zero = np.zeros(n_obs, dtype=bool)
        with atomic_path(output, suffix=".h5ad") as tmp, h5py.File(tmp, "w") as out:
            out.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            if pool:
                write_kept_parallel(out, pool, window, path, x_key, ranges, chunk, keep, genes, row_nnz, X.dtype)
            else:
                writer = CSRWriter(out, "X", len(genes), X.dtype)
                for start, m in X.iter_rows(chunk):
                    rows = slice(start, start + m.shape[0])
                    n_genes[rows], keep[rows], zero[rows], kept = filter_chunk(m, gene_ok_idx, genes, settings)
                    writer.append(kept)
                writer.close()
            if not keep.any():
                few = int((~keep & ~zero).sum())
                fix = (filter_fix("min_genes") if few else
                       "their counts are all on genes without protein embeddings: check the species or gene_column")
                raise UserError(f"{input_path}: no cells left after filtering ({few} of {n_obs} cells have fewer than "
                                f"min_genes={settings.min_genes} expressed genes, {int(zero.sum())} have zero counts "
                                f"on embedded genes); {fix}")
            obs = read_elem(f["obs"]).iloc[np.flatnonzero(keep)].copy()
            # each kept cell's row in the input: MERGE maps results back by it (names may repeat)
            obs["uce_input_row"] = np.flatnonzero(keep).astype(np.int64)
            dup_obs = int(obs.index.duplicated().sum())
            if dup_obs:
                log.warning("%s: %d duplicated obs names made unique; originals kept in obs['original_obs_name']",
                            input_path, dup_obs)
                obs["original_obs_name"] = obs.index.astype(str)
                obs.index = pd.Index(ad.utils.make_index_unique(pd.Index(obs.index.astype(str))))
            var = var.iloc[genes].copy()
            if settings.filter:
                obs["n_genes"] = n_genes[keep]
                var["n_cells"] = n_cells[genes]
            if symbol_source != "var_names":
                var["original_var_name"] = var.index.astype(str)
            var.index = pd.Index(symbols[genes].astype(str))
            obsm = {k: v[keep] for k, v in read_elem(f["obsm"]).items()} if "obsm" in f else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # duplicated symbols are kept on purpose (reference behaviour)
                for key, value in (("obs", obs), ("var", var), ("obsm", obsm), ("uns", {}), ("layers", {}),
                                   ("varm", {}), ("obsp", {}), ("varp", {})):
                    write_elem(out, key, value)
    log.info("preprocess: %d cells in %.1f s; CPU s: main process %.1f, workers %.1f", n_obs, time.time() - t0,
             *cpu_seconds())
    if zero.any():
        log.warning("%s: dropped %d cells with zero counts over the embedded genes", input_path, int(zero.sum()))
    return {
        "input": input_path.name, "counts_source": x_key, "gene_symbols_from": symbol_source,
        "cells_in": int(n_obs), "cells_kept": int(keep.sum()),
        "cells_dropped_min_genes": int(n_obs - keep.sum() - zero.sum()), "cells_dropped_zero_counts": int(zero.sum()),
        "genes_in": int(n_var), "genes_after_min_cells": int(gene_ok.sum()),
        "genes_with_embedding": int(has_emb.sum()), "genes_kept": int(len(genes)),
        "duplicate_obs_names": dup_obs, "duplicate_gene_symbols": int(var.index.duplicated().sum()),
        "filter": settings.filter, "min_cells": settings.min_cells, "min_genes": settings.min_genes,
        "seconds": round(time.time() - t0, 3),
    }


@contextlib.contextmanager
def shard_pool(input_path: Path, X: H5Matrix, workers: int, chunk: int):
    """Worker processes for the row-range passes, or None where they cannot help: one worker, a
    single chunk, a CSC matrix (no row access) or a converted format (read by the parent only).
    Spawned, not forked: a child forked while the parent holds the HDF5 file open shares its state."""
    from . import formats
    if workers < 2 or X.shape[0] <= chunk or X.kind == "csc" or formats.detect(input_path) != formats.H5AD:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def count_parallel(pool, window, path, x_key, ranges, chunk, n_var, input_path) -> tuple[np.ndarray, int, int]:
    """Pass 1 over row ranges: summed per-gene counts; the sequential pass's errors, in its order."""
    n_cells, n_bad, first_bad, noncount = np.zeros(n_var, dtype=np.int64), 0, -1, None
    for p in ordered_map(pool, count_range, [(path, x_key, lo, hi, chunk, n_var) for lo, hi in ranges], window):
        n_cells += p["n_cells"]
        n_bad += p["n_bad"]
        first_bad = p["first_bad"] if first_bad < 0 else first_bad
        noncount = noncount or p["noncount"]
    if noncount and (first_bad < 0 or noncount[0] < first_bad):
        raise UserError(f"{input_path}: {x_key} has negative or non-integer values in cells "
                        f"{noncount[0]}-{noncount[1]}; UCE needs raw counts: set counts_layer")
    return n_cells, n_bad, first_bad
