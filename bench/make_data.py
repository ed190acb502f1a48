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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--pbmc", type=Path, required=True)
    p.add_argument("--n-cells", type=int, required=True)
    p.add_argument("--n-genes", type=int, default=20_000)
    p.add_argument("--keep", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, required=True)
    a = p.parse_args()
    print(make_dataset(a.model_dir, a.pbmc, a.n_cells, a.output, n_genes=a.n_genes, keep=a.keep, seed=a.seed))


if __name__ == "__main__":
    main()
