"""Issue 12 item 3: the front half is model-independent. Real `nextflow run -resume` on the demo:
switching --model reruns only PREPARE_SPECIES, EMBED, MERGE and what follows it (ATLAS, REPORT,
MULTIQC); a file added to --model_dir
reruns nothing (tasks stage explicit files, not the folder)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from nf_utils import MODEL_DIR, assert_ok, ensure_demo, requires_engine, run_pipeline, simple_name

pytestmark = [pytest.mark.nextflow, pytest.mark.slow, requires_engine]
# ATLAS and MULTIQC: the demo has two datasets (human + mouse); both follow MERGE's new embeddings
MODEL_DEPENDENT = {"PREPARE_SPECIES", "EMBED", "MERGE", "ATLAS", "REPORT", "MULTIQC"}


def trace(out: Path, suffix: str) -> list[dict]:
    """A run's trace; a later run into the same --outdir moved it to pipeline_info/previous_<suffix>/."""
    path = next((out / "pipeline_info").glob(f"**/execution_trace_{suffix}.txt"))
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def statuses(out, suffix: str) -> dict[str, set[str]]:
    got: dict[str, set[str]] = {}
    for row in trace(out, suffix):
        got.setdefault(simple_name(row), set()).add(row["status"])
    return got


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ensure_demo()
    root = tmp_path_factory.mktemp("model_split")
    models = root / "model_files"
    shutil.copytree(MODEL_DIR, models)
    # A second checkpoint of the same shape and other weights, as the 33-layer file sits next to the
    # 4-layer one in the official folder.
    sd = torch.load(models / "4layer_model.torch")
    g = torch.Generator().manual_seed(1)
    sd = {k: (v + 0.05 * torch.randn(v.shape, generator=g) if k.startswith("transformer_encoder.") and v.is_floating_point()
              else v) for k, v in sd.items()}
    torch.save(sd, models / "other_model.torch")
    out = root / "out"
    args = ["--model_dir", str(models), "--outdir", str(out)]
    first = run_pipeline(root, *args, "--trace_report_suffix", "first")
    assert_ok(first)
    switched = run_pipeline(root, *args, "--model", "other_model.torch", "--trace_report_suffix", "switched", "-resume")
    assert_ok(switched)
    (models / "README.txt").write_text("an unrelated file\n")
    shutil.copy(models / "other_model.torch", models / "third_model.torch")
    added = run_pipeline(root, *args, "--model", "other_model.torch", "--trace_report_suffix", "added", "-resume")
    assert_ok(added)
    return out


def test_model_switch_reruns_only_the_model_dependent_tasks(runs):
    first, switched = statuses(runs, "first"), statuses(runs, "switched")
    assert set(first) == set(switched) and set(first) >= MODEL_DEPENDENT | {"SPECIES_VOCAB", "PREPROCESS", "SENTENCES"}
    for name, st in switched.items():
        want = {"COMPLETED"} if name in MODEL_DEPENDENT else {"CACHED"}
        assert st == want, (name, st, switched)


def test_switched_model_gives_other_embeddings(runs):
    import anndata as ad
    import numpy as np
    a = ad.read_h5ad(runs / "pbmc_demo" / "pbmc_demo_uce_adata.h5ad")
    assert a.uns["uce"]["model_file"] == "other_model.torch"
    # the first run's result, in its MERGE task's work dir (the published file is the switched run's)
    merge = next(r for r in trace(runs, "first") if simple_name(r) == "MERGE" and r["tag"] == "pbmc_demo")
    b = ad.read_h5ad(next(Path(merge["workdir"]).glob("*_uce_adata.h5ad")))
    assert a.n_obs == b.n_obs and not np.allclose(a.obsm["X_uce"], b.obsm["X_uce"])


def test_unrelated_file_in_model_dir_reruns_nothing(runs):
    added = statuses(runs, "added")
    assert added and all(st == {"CACHED"} for st in added.values()), added
