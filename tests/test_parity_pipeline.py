"""The sharded pipeline in compat mode against the reference on its own defaults, on model files in
the official shapes with fewer chromosome categories than chromosome rows (tests/official_layout.py).
This is the case where a derived chromosome offset shifted every chromosome token (issue 10)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_edge_dataset
from nf_utils import assert_ok, read_trace, requires_engine, run_pipeline, simple_name
from official_layout import tie_tokens, write_official_layout
from reference_oracle import model_argv, reference_args, run_reference

pytestmark = [pytest.mark.nextflow, pytest.mark.slow]


@requires_engine
def test_sharded_pipeline_matches_reference_on_official_layout(model_dir, tmp_path):
    import anndata as ad
    files = tmp_path / "model_files"
    info = write_official_layout(model_dir, files)
    (tmp_path / "data").mkdir()
    h5ad = make_edge_dataset(tmp_path / "data" / "edge.h5ad")
    sheet = tmp_path / "samplesheet.csv"
    sheet.write_text(f"sample,h5ad,species\nedge,{h5ad},human\n")
    out = tmp_path / "out"
    r = run_pipeline(tmp_path, "--input", str(sheet), "--model_dir", str(files), "--outdir", str(out),
                     "--compat", "reference", "--seed", "4", "--batch_size", "25", "--shard_size", "100",
                     "--trace_report_suffix", "run")
    assert_ok(r)
    assert sum(simple_name(x) == "EMBED" for x in read_trace(out, "run")) == 3
    ours = ad.read_h5ad(out / "edge" / "edge_uce_adata.h5ad")
    assert int(ours.uns["uce"]["seed"]) == 4

    ref = run_reference(reference_args(h5ad, files, tmp_path / "ref", batch_size=25, user_argv=model_argv(info)), 4)
    assert list(ours.obs_names) == list(ref["obs_names"])
    ties = tie_tokens(files)
    tie = np.array([any(len(g & set(s.tolist())) > 1 for g in ties) for s in ref["sentences"]])
    e, f = ours.obsm["X_uce"], ref["embeddings"]
    cos = np.sum(e * f, axis=1) / np.linalg.norm(e, axis=1) / np.linalg.norm(f, axis=1)
    print(f"\npipeline, 3 shards, official layout: {len(cos)} cells ({int(tie.sum())} with a start tie), "
          f"min cosine {cos[~tie].min():.9f}, max abs diff {np.abs(e - f).max():.3e}")
    assert cos[~tie].min() >= 0.99999
