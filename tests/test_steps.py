"""Unit tests of each step against the reference's own formulas and files."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import PBMC, run_uce


@pytest.fixture(scope="module")
def prepared(model_dir, edge_h5ad, tmp_path_factory):
    d = tmp_path_factory.mktemp("steps")
    run_uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--output", d / "h.pt")
    run_uce("preprocess", "--input", edge_h5ad, "--species-file", d / "h.pt", "--output", d / "p.h5ad", "--stats", d / "s.json")
    run_uce("index", "--adata", d / "p.h5ad", "--species-file", d / "h.pt", "--output", d / "i.npz")
    return d


def test_reference_weights_are_bit_exact():
    """Our sparse weights equal the reference's literal dense computation (torch log1p/sum, then
    numpy 1.26 `w / sum(w)`), including counts beyond the lookup table."""
    from uce_nf.sentences import reference_weights
    rng = np.random.default_rng(0)
    for G in (50, 765, 5000):
        for _ in range(20):
            dense = np.zeros(G, np.int64)
            nz = rng.choice(G, rng.integers(1, min(G, 800)), replace=False)
            dense[nz] = rng.integers(1, 70000 if rng.random() < 0.2 else 60, len(nz))
            w = torch.log1p(torch.tensor(dense).unsqueeze(0))
            w = (w / torch.sum(w))[0].numpy()
            literal = w / sum(w)  # the reference's line, run under numpy 1.26
            cols = np.flatnonzero(dense)
            np.testing.assert_array_equal(reference_weights(cols, dense[cols], G), literal[cols])


def test_fast_and_exact_compat_paths_agree(prepared):
    """The vectorised path (no start ties) and the per-chromosome path give identical sentences and
    leave the RNG in the same state."""
    from uce_nf.sentences import _truncated_counts, reference_sentence, tie_genes
    from uce_nf.tokens import load_index
    idx = load_index(prepared / "i.npz")
    fast = {**idx, "ties": tie_genes(idx)}
    m = _truncated_counts(sp.csr_matrix(ad.read_h5ad(prepared / "p.h5ad").X))
    a, b = np.random.RandomState(3), np.random.RandomState(3)
    for i in range(m.shape[0]):
        cols, vals = m.indices[m.indptr[i]:m.indptr[i + 1]], m.data[m.indptr[i]:m.indptr[i + 1]]
        np.testing.assert_array_equal(reference_sentence(a, cols, vals, fast), reference_sentence(b, cols, vals, idx))
    assert a.random_sample() == b.random_sample()


def test_sentence_layout(prepared):
    from uce_nf.sentences import load_sentences
    run_uce("sentences", "--adata", prepared / "p.h5ad", "--index", prepared / "i.npz", "--output-dir", prepared,
            "--name", "lay", "--workers", 1)
    z = load_sentences(prepared / "lay.shard-00000.sentences.npz")
    off = int(np.load(prepared / "i.npz")["chrom_token_offset"])
    for a, b in zip(z["offsets"][:50], z["offsets"][1:51]):
        s = z["tokens"][a:b].astype(np.int64)
        assert s[0] == 3  # CLS
        n_chrom = int((s >= off).sum())
        assert len(s) == 1 + 1024 + 2 * n_chrom
        assert (s == 2).sum() == n_chrom  # one closing token per chromosome
        opens = np.flatnonzero(s >= off)
        assert np.all(s[opens[1:] - 1] == 2)  # each chromosome opens right after the previous closes


def test_shard_bounds_fall_on_batches_in_compat():
    from uce_nf.sentences import shard_bounds
    assert shard_bounds(103, 60, 25, compat=True) == [(0, 50), (50, 100), (100, 103)]
    assert shard_bounds(103, 60, 25, compat=False) == [(0, 60), (60, 103)]
    assert shard_bounds(10, 3, 25, compat=True) == [(0, 10)]


def test_index_matches_reference_token_ids(prepared, model_dir):
    """Token ids by upper-cased first-insertion order + offset, as the reference's generate_idxs."""
    import pickle
    from uce.data_proc.data_utils import get_spec_chrom_csv, get_species_to_pe
    idx = np.load(prepared / "i.npz")
    genes = ad.read_h5ad(prepared / "p.h5ad", backed="r").var_names
    keys = list(get_species_to_pe(str(model_dir / "protein_embeddings"))["human"].keys())
    offset = pickle.load(open(model_dir / "species_offsets.pkl", "rb"))["human"]
    np.testing.assert_array_equal(idx["token_id"], [keys.index(g.upper()) + offset for g in genes])
    csv = get_spec_chrom_csv(str(model_dir / "species_chrom.csv"))
    human = csv[csv.species == "human"].set_index("gene_symbol").loc[[g.upper() for g in genes]]
    np.testing.assert_array_equal(idx["chrom"], human["spec_chrom"].cat.codes.to_numpy())
    assert idx["chrom"].dtype == human["spec_chrom"].cat.codes.dtype
    np.testing.assert_array_equal(idx["start"], human["start"].to_numpy())


def test_preprocess_stats_and_edge_cases(prepared):
    st = json.loads((prepared / "s.json").read_text())
    a = ad.read_h5ad(prepared / "p.h5ad")
    assert st["cells_in"] == 305 and st["cells_kept"] == 300 and st["cells_dropped_min_genes"] == 5
    assert "NOTAGENE0" not in a.var_names  # no embedding
    assert a.var_names[0] == ad.read_h5ad(PBMC).var_names[0].lower()  # lower-case symbol matched
    assert a.var_names.duplicated().sum() >= 1  # duplicated symbol kept, as the reference
    assert st["genes_after_min_cells"] < st["genes_in"]  # rare genes removed
    assert sp.issparse(a.X) and a.X.dtype == np.float32
    assert "n_genes" in a.obs and "n_cells" in a.var


def test_projected_table_equals_model_encoder(prepared, model_dir):
    """The precomputed projection equals the reference encoder applied to normalised token rows."""
    sf = torch.load(prepared / "h.pt", weights_only=False)
    sd = torch.load(model_dir / "4layer_model.torch")
    enc = torch.nn.Sequential(torch.nn.Linear(*sd["encoder.0.weight"].shape[::-1]), torch.nn.GELU(),
                              torch.nn.LayerNorm(sd["encoder.0.weight"].shape[0]))
    enc.load_state_dict({k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")})
    rows = torch.nn.functional.normalize(sd["pe_embedding.weight"][sf["vocab"]], dim=1)
    with torch.no_grad():
        want = enc(rows) * np.sqrt(enc[0].out_features)
    torch.testing.assert_close(sf["projected"], want, rtol=1e-6, atol=1e-6)


def test_official_table_rule(tmp_path):
    """A token file with the official 143,574 rows means the checkpoint's own table is used (§3.3)."""
    from uce_nf.model_files import ModelFiles, token_table
    torch.save(torch.zeros(143574, 2), tmp_path / "all_tokens.torch")
    sd = {"pe_embedding.weight": torch.ones(145469, 2), "encoder.0.weight": torch.zeros(4, 2)}
    files = ModelFiles(tmp_path)
    assert token_table(files, sd) is sd["pe_embedding.weight"]
    torch.save(torch.full((100, 2), 7.0), tmp_path / "all_tokens.torch")  # a new-species token file
    assert float(token_table(files, sd)[0, 0]) == 7.0
    torch.save(torch.zeros(100, 3), tmp_path / "all_tokens.torch")
    from uce_nf.io import UserError
    with pytest.raises(UserError, match="token width 3"):
        token_table(files, sd)


def test_model_matches_reference_module(model_dir):
    """Our batch-first model equals the reference TransformerModel (float +1 pad mask, fp32)."""
    from uce.model import TransformerModel
    from uce_nf.model import UCE
    from uce_nf.model_files import ModelConfig
    sd = torch.load(model_dir / "4layer_model.torch")
    cfg = ModelConfig.from_state_dict(sd)
    ref = TransformerModel(cfg.token_dim, cfg.d_model, cfg.nhead, cfg.d_hid, cfg.nlayers, cfg.output_dim)
    ref.pe_embedding = torch.nn.Embedding.from_pretrained(torch.zeros_like(sd["pe_embedding.weight"]))
    ref.load_state_dict(sd)
    ref.eval()
    ours = UCE.from_checkpoint(sd, cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, cfg.token_dim, generator=g)  # [L, B, token_dim]
    mask = torch.ones(3, 40)
    mask[1, 30:] = 0
    mask[2, 12:] = 0
    with torch.no_grad():
        _, want = ref(torch.nn.functional.normalize(x, dim=2), mask)
        projected = ref.encoder(torch.nn.functional.normalize(x, dim=2)) * np.sqrt(cfg.d_model)
        got = ours(projected.transpose(0, 1), (1 - mask)[:, None, None, :])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
