"""Big single datasets: PREPROCESS over row ranges in worker processes writes the same processed
file as the sequential pass, and default-mode sentences do not depend on the worker count."""

from __future__ import annotations

import json

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import make_edge_dataset, run_uce


@pytest.fixture(scope="module")
def big(model_dir, tmp_path_factory):
    """10,118 rows of real pbmc counts with every filter case (edge dataset), tiled so that obs
    names repeat, with a block of 1,000 few-gene cells (whole row ranges the filter drops) in the
    middle; 10,118 divides neither by the chunks nor by the worker counts used here."""
    d = tmp_path_factory.mktemp("scale")
    edge = ad.read_h5ad(make_edge_dataset(d / "edge.h5ad", n_cells=700, zero_cell=True))
    few = sp.csr_matrix(np.tile(np.r_[np.ones(10), np.zeros(edge.n_vars - 10)], (1000, 1)).astype(np.float32))
    X = sp.vstack([edge.X] * 7 + [few] + [edge.X] * 7, format="csr")[:10_118]
    names = (list(edge.obs_names) * 7 + [f"f{i}" for i in range(1000)] + list(edge.obs_names) * 7)[:10_118]
    ad.AnnData(X, obs=pd.DataFrame(index=names), var=edge.var).write_h5ad(d / "big.h5ad")
    run_uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--output", d / "h.pt")
    return d


def _run(d, name, workers, chunk, path=None):
    from uce_nf.preprocess import FilterSettings, preprocess
    from uce_nf.species import load_species
    st = preprocess(path or d / "big.h5ad", load_species(d / "h.pt"), FilterSettings(), d / f"{name}.h5ad",
                    chunk=chunk, workers=workers)
    st.pop("seconds")
    return st


def keep_all_dropped(d, lo, hi) -> bool:
    """Whether rows [lo, hi) of big.h5ad are all few-gene cells (a range with nothing to write)."""
    return lo >= 7 * 706 and hi <= 7 * 706 + 1000


def assert_same_file(a, b):
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for key in ("data", "indices", "indptr"):
            x, y = fa["X"][key], fb["X"][key]
            assert (x.dtype, x.chunks, x.compression, x.compression_opts) == (y.dtype, y.chunks, y.compression,
                                                                               y.compression_opts), key
            np.testing.assert_array_equal(x[:], y[:], err_msg=key)
        assert sorted(fa["X"].attrs) == sorted(fb["X"].attrs)
        assert all(np.array_equal(fa["X"].attrs[k], fb["X"].attrs[k]) for k in fa["X"].attrs)
    x, y = ad.read_h5ad(a), ad.read_h5ad(b)
    pd.testing.assert_frame_equal(x.obs, y.obs)
    pd.testing.assert_frame_equal(x.var, y.var)


@pytest.mark.parametrize("workers,chunk", [(7, 64), (5, 128)])
def test_parallel_preprocess_writes_the_sequential_file(big, workers, chunk):
    """Row ranges of uneven size, a range whose cells are all dropped, chunk boundaries of the
    compressed output falling inside ranges and between them: same arrays, same dtypes and chunking."""
    from uce_nf.preprocess_shards import CHUNK_ELEMS, row_ranges
    seq = _run(big, f"seq{chunk}", 1, chunk)
    assert any(keep_all_dropped(big, lo, hi) for lo, hi in row_ranges(10_118, workers, chunk))
    par = _run(big, f"par{workers}_{chunk}", workers, chunk)
    assert par == seq
    assert seq["cells_dropped_min_genes"] >= 1000 and seq["cells_dropped_zero_counts"] > 0 and seq["duplicate_obs_names"]
    assert len(row_ranges(10_118, workers, chunk)) > workers  # really split
    with h5py.File(big / f"seq{chunk}.h5ad") as f:
        assert f["X"]["data"].shape[0] > 20 * CHUNK_ELEMS and f["X"]["data"].shape[0] % CHUNK_ELEMS
    assert_same_file(big / f"seq{chunk}.h5ad", big / f"par{workers}_{chunk}.h5ad")


def test_cli_workers_option(big):
    """`uce preprocess --workers 3` (default chunks of 8,192 rows: two ranges, one short) gives the
    file of `--workers 1`; the stats JSON too, but for the seconds."""
    for w in (1, 3):
        run_uce("preprocess", "--input", big / "big.h5ad", "--species-file", big / "h.pt", "--workers", w,
                "--output", big / f"cli{w}.h5ad", "--stats", big / f"cli{w}.json")
    s1, s3 = (json.loads((big / f"cli{w}.json").read_text()) for w in (1, 3))
    s1.pop("seconds"), s3.pop("seconds")
    assert s1 == s3
    assert_same_file(big / "cli1.h5ad", big / "cli3.h5ad")


@pytest.mark.parametrize("bad", [[(1500, -1.0), (2000, np.nan)], [(600, np.inf), (1500, 0.5), (9000, np.nan)]])
def test_parallel_errors_match_the_sequential_ones(big, bad):
    """Values that are not counts in one range and NaN/inf in others: the parallel pass reports what
    the sequential one does (which comes first decides; NaN/inf are counted over the whole file)."""
    from uce_nf.io import UserError
    a = ad.read_h5ad(big / "big.h5ad")
    X = a.X.tolil()
    for row, value in bad:
        X[row, int(a.X[row].indices[3])] = value
    a.X = X.tocsr()
    path = big / "bad.h5ad"
    a.write_h5ad(path)
    msgs = []
    for w in (1, 3):
        with pytest.raises(UserError) as e:
            _run(big, f"bad{w}", w, 64, path=path)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]
    assert ("NaN/inf" in msgs[0]) == (bad[0][1] != -1.0)


def test_default_sentences_do_not_depend_on_workers(big):
    """Default-mode sentences: every cell draws from its own stream, so 1 and 3 workers (and any
    shard size) give the same tokens; compat mode is one sequential MT19937 stream and ignores
    --workers, so it is the same by construction."""
    from uce_nf.sentences import load_sentences
    run_uce("index", "--adata", big / "cli1.h5ad", "--species-file", big / "h.pt", "--output", big / "i.npz")
    out = {}
    for w, shard in ((1, 10**6), (3, 2_500)):
        run_uce("sentences", "--adata", big / "cli1.h5ad", "--index", big / "i.npz", "--workers", w,
                "--shard-size", shard, "--output-dir", big / f"s{w}", "--name", "x")
        parts = [load_sentences(p) for p in sorted((big / f"s{w}").glob("*.npz"))]
        out[w] = (np.concatenate([p["tokens"] for p in parts]), np.concatenate([np.diff(p["offsets"]) for p in parts]))
    np.testing.assert_array_equal(out[1][0], out[3][0])
    np.testing.assert_array_equal(out[1][1], out[3][1])
