"""Compat mode against the reference implementation (uce-model 0.1.4) on the same inputs and seeds.

Target: per-cell cosine >= 0.99999, sentences identical token for token, same cells and genes kept.
The reference runs on its own parser defaults plus what a user would pass (tests/reference_oracle.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_edge_dataset, read_embeddings, run_uce
from official_layout import tie_tokens, write_official_layout
from reference_oracle import demo_user_argv, model_argv, reference_args, run_reference

CASES = [(0, 25), (7, 8)]  # (seed, batch_size)


def _ours(h5ad, model_dir, tmp, seed, batch_size, shard_size=None, extra=(), species="human"):
    """The step commands, as the pipeline chains them; returns (obs names, embeddings, sentences)."""
    from uce_nf.sentences import load_sentences
    d = tmp / f"ours_{seed}_{batch_size}_{shard_size}"
    d.mkdir()
    sf = d / f"{species}.species.pt"
    run_uce("prepare-species", "--species", species, "--model-dir", model_dir, "--output", sf)
    run_uce("preprocess", "--input", h5ad, "--species-file", sf, "--output", d / "p.h5ad", "--stats", d / "s.json", *extra)
    run_uce("index", "--adata", d / "p.h5ad", "--species-file", sf, "--output", d / "i.npz")
    samp = ["--seed", seed, "--compat", "reference", "--batch-size", batch_size]
    run_uce("sentences", "--adata", d / "p.h5ad", "--index", d / "i.npz", "--output-dir", d, "--name", "x",
            "--shard-size", shard_size or 10**9, *samp)
    shards = sorted(d.glob("x.shard-*.sentences.npz"))
    embs = []
    for s in shards:
        out = s.with_name(s.name.replace("sentences", "embeddings"))
        run_uce("embed", "--sentences", s, "--species-file", sf, "--model-dir", model_dir, "--output", out, *samp)
        embs.append(out)
    run_uce("merge", "--adata", d / "p.h5ad", *sum((["--embeddings", e] for e in embs), []), "--stats", d / "s.json",
            "--species-file", sf, "--output", d / "out.h5ad", *samp)
    sentences = []
    for s in shards:
        z = load_sentences(s)
        sentences += [z["tokens"][a:b].astype(np.int64) for a, b in zip(z["offsets"][:-1], z["offsets"][1:])]
    names, emb = read_embeddings(d / "out.h5ad")
    return names, emb, sentences, len(shards)


def _compare(ref, ours, label, ties=()):
    """Sentences equal token for token and per-cell cosine >= 0.99999 on every cell without a start tie;
    tie cells (two distinct drawn genes at one chromosome start) are reported apart."""
    names, emb, sentences, _ = ours
    np.testing.assert_array_equal(names, ref["obs_names"])
    assert len(sentences) == len(ref["sentences"])
    tie = np.array([any(len(g & set(s.tolist())) > 1 for g in ties) for s in ref["sentences"]], dtype=bool)
    mismatched = [i for i, (a, b) in enumerate(zip(sentences, ref["sentences"])) if not np.array_equal(a, b)]
    cos = np.sum(emb * ref["embeddings"], axis=1) / np.linalg.norm(ref["embeddings"], axis=1)
    diff = np.abs(emb - ref["embeddings"]).max()
    print(f"\n{label}: {len(cos)} cells ({int(tie.sum())} with a start tie), min cosine {cos[~tie].min():.9f} "
          f"(tie cells {cos[tie].min() if tie.any() else float('nan'):.9f}), max abs diff {diff:.3e}, "
          f"sentence mismatches {len(mismatched)} ({sum(not tie[i] for i in mismatched)} without a tie)")
    assert not [i for i in mismatched if not tie[i]], f"sentences differ from the reference for cells {mismatched[:10]}"
    assert cos[~tie].min() >= 0.99999
    return cos, diff


def _demo_ref(h5ad, model_dir, workdir, seed, batch_size):
    """The reference on the demo files: their token file replaces the table, so a user passes the
    CHROM_TOKEN_OFFSET the files were built with (a fact of the demo, recorded in demo_info.json)."""
    args = reference_args(h5ad, model_dir, workdir, batch_size=batch_size, user_argv=demo_user_argv(model_dir))
    assert args.CHROM_TOKEN_OFFSET != 143_574
    return run_reference(args, seed)


@pytest.mark.parametrize("seed,batch_size", CASES)
def test_compat_matches_reference(model_dir, edge_h5ad, tmp_path, seed, batch_size):
    ref = _demo_ref(edge_h5ad, model_dir, tmp_path / "ref", seed, batch_size)
    ours = _ours(edge_h5ad, model_dir, tmp_path, seed, batch_size)
    assert len(ref["var_names"]) < 765 + 34, "the edge dataset must lose genes to the filters"
    assert len(ref["obs_names"]) == 300, "the 5 few-gene cells must be filtered"
    _compare(ref, ours, f"seed {seed} batch {batch_size}", tie_tokens(model_dir))


@pytest.fixture(scope="module")
def official_layout(model_dir, tmp_path_factory):
    dest = tmp_path_factory.mktemp("official_layout")
    return dest, write_official_layout(model_dir, dest)


@pytest.mark.parametrize("seed,batch_size", CASES)
def test_official_layout_matches_reference_on_its_defaults(official_layout, edge_h5ad, tmp_path, seed, batch_size):
    """Official table shapes, fewer chromosome categories than chromosome rows, species blocks out of
    alphabetical order, csv genes without embeddings. The reference runs on its parser's defaults
    (CHROM_TOKEN_OFFSET 143574); we pass nothing either. Sharded and unsharded."""
    files, info = official_layout
    ref = run_reference(reference_args(edge_h5ad, files, tmp_path / "ref", batch_size=batch_size,
                                       user_argv=model_argv(info)), seed)
    assert ref["sentences"][0].max() >= 143_574, "chromosome tokens come after the official token rows"
    ties = tie_tokens(files)
    one = _ours(edge_h5ad, files, tmp_path, seed, batch_size)
    _compare(ref, one, f"official layout, seed {seed} batch {batch_size}", ties)
    many = _ours(edge_h5ad, files, tmp_path, seed, batch_size, shard_size=2 * batch_size + 1)
    assert many[3] > 1
    _compare(ref, many, f"official layout sharded ({many[3]} shards), seed {seed} batch {batch_size}", ties)
    np.testing.assert_array_equal(one[1], many[1])


def test_sharded_forward_equals_unsharded(model_dir, edge_h5ad, tmp_path):
    """Shards on multiples of batch_size: every batch is the same batch, so results are identical."""
    one = _ours(edge_h5ad, model_dir, tmp_path, 3, 25)
    many = _ours(edge_h5ad, model_dir, tmp_path, 3, 25, shard_size=60)  # rounded down to 50
    assert many[3] == 6
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[1], many[1])


def test_zero_count_cell_dropped_without_changing_others(model_dir, tmp_path):
    """The reference crashes on a cell with counts only on genes without embeddings; we drop it, and
    every other cell equals the reference run on the file without that cell (uce-reference.md §15)."""
    with_zero = make_edge_dataset(tmp_path / "with_zero.h5ad", zero_cell=True)
    without = make_edge_dataset(tmp_path / "without_zero.h5ad", zero_cell=False)
    ref = _demo_ref(without, model_dir, tmp_path / "ref", 1, 25)
    ours = _ours(with_zero, model_dir, tmp_path, 1, 25)
    _compare(ref, ours, "zero-count cell dropped", tie_tokens(model_dir))
    stats = json.loads(next(tmp_path.glob("ours_1_25_None/s.json")).read_text())
    assert stats["cells_dropped_zero_counts"] == 1
