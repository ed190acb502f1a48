"""Synthetic wide datasets with real counts and real sparsity, for the benchmarks (not a test).

Each cell is built from real pbmc counts (the demo's pbmc68k cells, 765 genes, ~249 expressed):
the gene axis (n_genes, default 20,000 vocabulary genes of a `uce make-demo --n-human-genes 20000`
model folder) is cut into tiles of 765 genes; tile t of a cell holds the row of a bootstrapped
pbmc cell (a fresh draw per tile), and each non-zero count is kept with probability `keep`
(default 0.3). Result: ~1,950 expressed genes per cell out of 20,000 (~10% density, what a 10x v3
PBMC cell shows), real count values and real per-cell variation. Written in row chunks straight
to an AnnData-encoded h5ad (CSR float32), so 1M cells never sit in memory.

    python bench/make_data.py --model-dir /tmp/bench/g20k/model_files --pbmc assets/demo/pbmc_demo.h5ad \
        --n-cells 200000 --output /tmp/bench/syn_200k.h5ad
    # 2M cells at copy speed: the 200k cells above repeated (model dir and pbmc are then unused)
    python bench/make_data.py --model-dir - --pbmc - --n-cells 2000000 --tile-from /tmp/bench/syn_200k.h5ad \
        --output /tmp/bench/syn_2m.h5ad
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

try:  # anndata >= 0.11
    from anndata.io import write_elem
except ImportError:  # pragma: no cover
    from anndata.experimental import write_elem

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from uce_nf.io import CSRWriter, atomic_path  # noqa: E402


def human_genes(model_dir: Path, n_genes: int, seed: int) -> np.ndarray:
    csv = pd.read_csv(Path(model_dir) / "species_chrom.csv")
    genes = csv.loc[csv["species"] == "human", "gene_symbol"].drop_duplicates().to_numpy()
    if len(genes) < n_genes:
        raise SystemExit(f"{model_dir} has {len(genes)} human genes < {n_genes}: run "
                         f"`uce make-demo --n-human-genes {n_genes} --no-data`")
    return np.random.default_rng(seed).permutation(genes)[:n_genes].astype(str)


def synth_chunk(src: sp.csr_matrix, n: int, n_genes: int, keep: float, rng: np.random.Generator) -> sp.csr_matrix:
    w = src.shape[1]
    tiles = []
    for t in range(-(-n_genes // w)):
        m = src[rng.integers(0, src.shape[0], n)]
        width = min(w, n_genes - t * w)
        if width < w:
            m = m[:, :width]
        m = m.tocoo()
        sel = rng.random(m.nnz) < keep
        tiles.append(sp.csr_matrix((m.data[sel], (m.row[sel], m.col[sel])), shape=(n, width)))
    out = sp.hstack(tiles, format="csr").astype(np.float32)
    out.sort_indices()
    return out


def make_dataset(model_dir: Path, pbmc: Path, n_cells: int, output: Path, *, n_genes: int = 20_000,
                 keep: float = 0.3, seed: int = 0, chunk: int = 20_000) -> dict:
    t0 = time.time()
    src = sp.csr_matrix(ad.read_h5ad(pbmc).X).astype(np.float32)
    genes = human_genes(model_dir, n_genes, seed)
    rng = np.random.default_rng(seed + 1)
    nnz = 0
    with atomic_path(output, suffix=".h5ad") as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        w = CSRWriter(f, "X", n_genes, np.float32, index_dtype=np.int32)
        for s in range(0, n_cells, chunk):
            m = synth_chunk(src, min(chunk, n_cells - s), n_genes, keep, rng)
            nnz += m.nnz
            w.append(m)
        w.close()
        obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)]))
        for key, value in (("obs", obs), ("var", pd.DataFrame(index=pd.Index(genes))), ("obsm", {}), ("uns", {}),
                           ("layers", {}), ("varm", {}), ("obsp", {}), ("varp", {})):
            write_elem(f, key, value)
    return {"path": str(output), "n_cells": n_cells, "n_genes": n_genes, "nnz_per_cell": nnz / n_cells,
            "density": nnz / n_cells / n_genes, "bytes": output.stat().st_size, "seconds": round(time.time() - t0, 1)}


def tile_dataset(src: Path, n_cells: int, output: Path, chunk: int = 20_000) -> dict:
    """An n_cells file made of `src`'s rows repeated in order, with fresh unique obs names: big
    files at copy speed (generating 1M cells takes minutes of CPU). Per-cell cost and sparsity are
    the source's; repeats are >= src rows apart, so they do not help gzip's 32 KB window."""
    from uce_nf.io import H5Matrix
    t0 = time.time()
    with h5py.File(src, "r") as f, atomic_path(output, suffix=".h5ad") as tmp, h5py.File(tmp, "w") as out:
        X = H5Matrix(f["X"])
        n_src, n_genes = X.shape
        out.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        w = CSRWriter(out, "X", n_genes, np.float32, index_dtype=np.int32, compression=None)
        for s in range(0, n_cells, chunk):
            lo = s % n_src
            w.append(X.rows(lo, min(lo + chunk, n_src, lo + n_cells - s)))
        w.close()
        for key in ("var", "obsm", "uns", "layers", "varm", "obsp", "varp"):
            f.copy(f[key], out, key)
        write_elem(out, "obs", pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(w.n_rows)])))
    return {"path": str(output), "n_cells": w.n_rows, "tiled_from": str(src), "bytes": output.stat().st_size,
            "seconds": round(time.time() - t0, 1)}


def tile_virtual(src: Path, n_cells: int, output: Path) -> dict:
    """The same as tile_dataset for an n_cells multiple of src's rows, with no copy: X's data and
    indices are HDF5 virtual datasets mapping src's arrays repeatedly (indptr and obs are real).
    Reads cost what they cost on a real file, except that the page cache may hold src."""
    t0 = time.time()
    with h5py.File(src, "r") as f, atomic_path(output, suffix=".h5ad") as tmp, h5py.File(tmp, "w") as out:
        n_src = f["X"].attrs["shape"][0]
        if n_cells % n_src:
            raise SystemExit(f"--virtual needs --n-cells a multiple of {n_src}")
        reps = n_cells // n_src
        g = out.create_group("X")
        for k, v in f["X"].attrs.items():
            g.attrs[k] = v
        g.attrs["shape"] = (n_cells, f["X"].attrs["shape"][1])
        nnz = f["X"]["data"].shape[0]
        for key in ("data", "indices"):
            layout = h5py.VirtualLayout(shape=(reps * nnz,), dtype=f["X"][key].dtype)
            vsrc = h5py.VirtualSource(str(Path(src).resolve()), f"X/{key}", shape=(nnz,))
            for r in range(reps):
                layout[r * nnz:(r + 1) * nnz] = vsrc
            g.create_virtual_dataset(key, layout)
        indptr = f["X"]["indptr"][:].astype(np.int64)
        g.create_dataset("indptr", data=np.concatenate([indptr[:-1] + r * nnz for r in range(reps)] + [[reps * nnz]]))
        for key in ("var", "obsm", "uns", "layers", "varm", "obsp", "varp"):
            f.copy(f[key], out, key)
        write_elem(out, "obs", pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)])))
    return {"path": str(output), "n_cells": n_cells, "virtual_tiles_of": str(src), "seconds": round(time.time() - t0, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--pbmc", type=Path, required=True)
    p.add_argument("--n-cells", type=int, required=True)
    p.add_argument("--n-genes", type=int, default=20_000)
    p.add_argument("--keep", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--tile-from", type=Path, help="repeat the rows of this synthetic file instead of generating")
    p.add_argument("--virtual", action="store_true", help="with --tile-from: map the rows (HDF5 virtual datasets), no copy")
    a = p.parse_args()
    if a.tile_from and a.virtual:
        return print(tile_virtual(a.tile_from, a.n_cells, a.output))
    if a.tile_from:
        return print(tile_dataset(a.tile_from, a.n_cells, a.output))
    print(make_dataset(a.model_dir, a.pbmc, a.n_cells, a.output, n_genes=a.n_genes, keep=a.keep, seed=a.seed))


if __name__ == "__main__":
    main()
