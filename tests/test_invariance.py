"""Default (context-free) mode: a cell's embedding depends on that cell only.

Each test changes one thing — batch size, cell order, sharding, the other cells in the file — and
checks every shared cell to <= 1e-5 max abs difference. --no-filter keeps the gene set fixed when
the set of cells changes (the min_cells filter depends on the other cells, by design of UCE).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from conftest import read_embeddings, run_uce

TOL = 1e-5


@pytest.fixture(scope="module")
def species_file(model_dir, tmp_path_factory):
    sf = tmp_path_factory.mktemp("sf") / "human.species.pt"
    run_uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--output", sf)
    return sf


def embed_default(h5ad, model_dir, species_file, d, batch_size=25, shard_size=10**9, filter_=False):
    d.mkdir(parents=True)
    flt = [] if filter_ else ["--no-filter"]
    run_uce("preprocess", "--input", h5ad, "--species-file", species_file, "--output", d / "p.h5ad", "--stats", d / "s.json", *flt)
    run_uce("index", "--adata", d / "p.h5ad", "--species-file", species_file, "--output", d / "i.npz")
    run_uce("sentences", "--adata", d / "p.h5ad", "--index", d / "i.npz", "--output-dir", d, "--name", "x",
            "--shard-size", shard_size, "--seed", 5, "--workers", 2)
    embs = []
    for s in sorted(d.glob("x.shard-*.sentences.npz")):
        out = s.with_name(s.name.replace("sentences", "embeddings"))
        run_uce("embed", "--sentences", s, "--species-file", species_file, "--model-dir", model_dir, "--output", out,
                "--batch-size", batch_size)
        embs.append(out)
    run_uce("merge", "--adata", d / "p.h5ad", *sum((["--embeddings", e] for e in embs), []), "--stats", d / "s.json",
            "--species-file", species_file, "--output", d / "out.h5ad", "--seed", 5)
    names, emb = read_embeddings(d / "out.h5ad")
    return dict(zip(names, emb)), len(embs)


@pytest.fixture(scope="module")
def baseline(edge_h5ad, model_dir, species_file, tmp_path_factory):
    return embed_default(edge_h5ad, model_dir, species_file, tmp_path_factory.mktemp("base") / "run")[0]


def assert_same(a: dict, b: dict, label: str):
    shared = sorted(set(a) & set(b))
    assert len(shared) >= 50
    diff = max(np.abs(a[k] - b[k]).max() for k in shared)
    print(f"\n{label}: {len(shared)} cells, max abs diff {diff:.2e}")
    assert diff <= TOL, f"{label}: max abs diff {diff}"


def test_batch_size_invariance(baseline, edge_h5ad, model_dir, species_file, tmp_path):
    for bs in (1, 7, 64):
        other, _ = embed_default(edge_h5ad, model_dir, species_file, tmp_path / f"bs{bs}", batch_size=bs)
        assert_same(baseline, other, f"batch size {bs}")


def test_sharding_invariance(baseline, edge_h5ad, model_dir, species_file, tmp_path):
    other, n = embed_default(edge_h5ad, model_dir, species_file, tmp_path / "sharded", shard_size=37)
    assert n > 5
    assert_same(baseline, other, "37-cell shards")


def test_cell_order_invariance(baseline, edge_h5ad, model_dir, species_file, tmp_path):
    a = ad.read_h5ad(edge_h5ad)
    perm = np.random.default_rng(0).permutation(a.n_obs)
    a[perm].copy().write_h5ad(tmp_path / "shuffled.h5ad")
    other, _ = embed_default(tmp_path / "shuffled.h5ad", model_dir, species_file, tmp_path / "run")
    assert_same(baseline, other, "shuffled cell order")


def test_other_cells_invariance(baseline, edge_h5ad, model_dir, species_file, tmp_path):
    a = ad.read_h5ad(edge_h5ad)
    a[::3].copy().write_h5ad(tmp_path / "subset.h5ad")  # a third of the cells, different neighbours
    other, _ = embed_default(tmp_path / "subset.h5ad", model_dir, species_file, tmp_path / "run")
    assert len(other) < len(baseline)
    assert_same(baseline, other, "every third cell only")


def test_default_mode_is_seeded_and_differs_from_other_seed(edge_h5ad, model_dir, species_file, tmp_path):
    from uce_nf.sentences import cell_rng
    assert cell_rng(5, "AAAC-1").random() == cell_rng(5, "AAAC-1").random()
    assert cell_rng(5, "AAAC-1").random() != cell_rng(6, "AAAC-1").random()
    assert cell_rng(5, "AAAC-1").random() != cell_rng(5, "AAAC-2").random()
