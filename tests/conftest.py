"""Shared fixtures: the committed demo files, and small real-count datasets with edge cases."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parent.parent
DEMO = Path(os.environ.get("UCE_NF_DEMO", ROOT / "assets" / "demo"))
MODEL_DIR = DEMO / "model_files"
PBMC = DEMO / "pbmc_demo.h5ad"
MOUSE = DEMO / "mouse_demo.h5ad"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "4layer_model.torch").exists():
        pytest.fail(f"{MODEL_DIR} missing: the demo model files are committed; regenerate with `uce make-demo`")
    return MODEL_DIR


def make_edge_dataset(path: Path, n_cells: int = 300, zero_cell: bool = False, seed: int = 0) -> Path:
    """pbmc cells plus every case the filters and gene matching must handle:
    genes without embeddings, genes in < 10 cells, a lower-case symbol, a duplicated symbol,
    cells with < 25 genes, and (optionally) a cell whose counts are all on genes without embeddings."""
    rng = np.random.default_rng(seed)
    a = ad.read_h5ad(PBMC)[:n_cells].copy()
    X = sp.csr_matrix(a.X)
    names = list(a.var_names)
    names[0] = names[0].lower()  # lower-case symbol: matched case-insensitively
    dup = sp.csr_matrix(X[:, 1].toarray() + rng.integers(0, 2, (n_cells, 1)))  # duplicated symbol, other counts
    fake = sp.csr_matrix(rng.integers(0, 3, (n_cells, 30)) * (rng.random((n_cells, 30)) < 0.5))  # no embeddings
    rare = sp.csr_matrix(np.zeros((n_cells, 3)))
    rare[:5] = 4  # expressed in 5 cells only: removed by min_cells=10
    X = sp.hstack([X, dup, fake, rare], format="csr").astype(np.float32)
    names += [names[1]] + [f"NOTAGENE{i}" for i in range(30)] + names[2:5]  # rare copies of real symbols
    # few-gene cells (removed by min_genes=25)
    few = sp.csr_matrix((5, X.shape[1]), dtype=np.float32).tolil()
    few[:, :10] = 1
    blocks = [X, few.tocsr()]
    obs_names = list(a.obs_names) + [f"few{i}" for i in range(5)]
    labels = list(a.obs["bulk_labels"].astype(str)) + ["few"] * 5
    if zero_cell:
        z = sp.lil_matrix((1, X.shape[1]), dtype=np.float32)
        start = a.n_vars + 1
        z[0, start:start + 30] = 2  # 30 expressed genes, none with an embedding
        blocks.append(z.tocsr())
        obs_names.append("zero_embedding_cell")
        labels.append("zero")
    out = ad.AnnData(sp.vstack(blocks, format="csr"), obs=pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=obs_names),
                     var=pd.DataFrame(index=names))
    out.write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def edge_h5ad(tmp_path_factory) -> Path:
    return make_edge_dataset(tmp_path_factory.mktemp("edge") / "edge.h5ad")


def run_uce(*args: str) -> None:
    """Run a `uce` command in-process; fail with its output on a non-zero exit."""
    from click.testing import CliRunner
    from uce_nf.cli import main
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output


def read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    a = ad.read_h5ad(path)
    return np.asarray(a.obs_names), a.obsm["X_uce"]
