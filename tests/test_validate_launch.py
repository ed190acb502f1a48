"""A real launch with one good and two bad datasets (issue 10): the run stops after VALIDATE,
before any heavy task, and the first ERROR line of Nextflow's output is the problem itself, one
line per bad dataset, naming the sample and the path the user wrote in the samplesheet (resolved),
never the task's staged copy (inputs/N/x.h5ad)."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from conftest import PBMC
from nf_utils import requires_engine, run_pipeline

pytestmark = [pytest.mark.nextflow, requires_engine]
HEAVY = ("uce-prepare-species", "uce-preprocess", "uce-index", "uce-sentences", "uce-embed", "uce-merge")


def started(launch: Path) -> set[str]:
    """bin/uce-* commands of every task that was started (from the work dirs' .command.sh)."""
    return {c for sh in (launch / "work").glob("*/*/.command.sh") for c in HEAVY + ("uce-validate",)
            if re.search(rf"\b{c}\b", sh.read_text())}


@pytest.fixture(scope="module")
def bad_launch(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate_launch")
    data = root / "data"
    data.mkdir()
    a = ad.read_h5ad(PBMC)
    a[:5].copy().write_h5ad(data / "five_cells.h5ad")  # every gene removed by min_cells=10
    b = a[:60].copy()
    X = b.X.toarray().astype(np.float32)
    X[2, 7], X[11, 3] = np.nan, np.inf
    b.X = sp.csr_matrix(X)
    b.write_h5ad(data / "with_nan.h5ad")
    sheet = root / "samplesheet.csv"
    # relative paths, as users write them: resolved against the samplesheet's folder
    sheet.write_text("sample,h5ad,species\n"
                     f"good,{PBMC},human\nfive,data/five_cells.h5ad,human\nnan,data/with_nan.h5ad,human\n")
    r = run_pipeline(root, "--input", str(sheet), "--outdir", str(root / "results"))
    return root, r


def test_first_error_line_names_sample_and_samplesheet_path(bad_launch):
    root, r = bad_launch
    assert r.returncode != 0, r.stdout[-3000:]
    lines = r.stdout.splitlines()
    first_error = next((i for i, l in enumerate(lines) if l.startswith("ERROR")), None)
    assert first_error is not None, r.stdout[-3000:]
    # the problem is the first thing shown: the error lines come right after the VALIDATE task
    # line, before any ERROR, with no bash script, command or work dir in between
    shown = [l for l in lines[:first_error + 2] if "VALIDATE: sample" in l]
    assert shown, r.stdout[-3000:]
    five = str(root / "data" / "five_cells.h5ad")
    nan = str(root / "data" / "with_nan.h5ad")
    head = lines[first_error]
    assert "VALIDATE: sample 'five'" in head and f"({five})" in head, head
    assert "min_cells=10" in head and "--filter false" in head, head
    nan_line = next(l for l in lines[first_error:] if "VALIDATE: sample 'nan'" in l)
    assert f"({nan})" in nan_line and "2 NaN/inf values" in nan_line, nan_line
    for line in (head, nan_line):
        assert len(line) < 500
    assert "good" not in "".join(l for l in lines if "VALIDATE: sample" in l)
    for text in ("inputs/", "Command executed", ".command.sh", "Work dir"):
        assert text not in r.stdout, f"{text!r} in the output:\n{r.stdout[-3000:]}"


def test_bad_dataset_stops_the_run_before_heavy_tasks(bad_launch):
    root, _ = bad_launch
    assert started(root) == {"uce-validate"}, started(root)
    # VALIDATE's JSON (published) records each failure for later inspection
    import json
    v = json.loads((root / "results" / "pipeline_info" / "validated.json").read_text())
    assert set(v) == {"good", "five", "nan"} and "error" not in v["good"] and "NaN/inf" in v["nan"]["error"]
