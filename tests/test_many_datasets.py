"""Issue 12 item 4: a samplesheet of many datasets through the real channel graph (-stub-run): one
VALIDATE per dataset, vocabularies and projections once per species, every dataset merged and
reported. bench/stub_many.py runs the same with 500 datasets and times it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from nf_utils import assert_ok, fake_model_dir, read_trace, run_pipeline, simple_name

pytestmark = pytest.mark.nextflow
N = 50


def many_inputs(root: Path, n: int) -> tuple[Path, Path]:
    """n empty datasets (two species, alternating) and empty model files: enough for -stub-run."""
    models = fake_model_dir(root)
    data = root / "data"
    data.mkdir(exist_ok=True)
    rows = ["sample,h5ad,species"]
    for i in range(n):
        (data / f"d{i:04d}.h5ad").touch()
        rows.append(f"d{i:04d},data/d{i:04d}.h5ad,{'human' if i % 2 == 0 else 'mouse'}")
    sheet = root / "samplesheet.csv"
    sheet.write_text("\n".join(rows) + "\n")
    return sheet, models


def test_stub_run_of_many_datasets(tmp_path):
    sheet, models = many_inputs(tmp_path, N)
    out = tmp_path / "out"
    r = run_pipeline(tmp_path, "-stub-run", "--input", str(sheet), "--model_dir", str(models), "--outdir", str(out),
                     "--trace_report_suffix", "many", timeout=1800)
    assert_ok(r)
    rows = read_trace(out, "many")
    assert {row["status"] for row in rows} == {"COMPLETED"}
    counts = Counter(simple_name(row) for row in rows)
    # the stub SENTENCES writes 2 shards per dataset
    assert counts == {"SPECIES_VOCAB": 2, "VALIDATE": N, "PREPARE_SPECIES": 2, "PREPROCESS": N, "INDEX": N,
                      "SENTENCES": N, "EMBED": 2 * N, "MERGE": N, "ATLAS": 1, "REPORT": 1, "MULTIQC": 1}, counts
    assert sorted(row["tag"] for row in rows if simple_name(row) == "VALIDATE") == [f"d{i:04d}" for i in range(N)]
    for i in (0, N - 1):
        assert (out / f"d{i:04d}" / f"d{i:04d}_uce_adata.h5ad").exists()
    valid = (out / "pipeline_info" / "samplesheet.valid.csv").read_text().splitlines()
    assert len(valid) == N + 1 and valid[1] == f"d0000,{tmp_path / 'data' / 'd0000.h5ad'},human", valid[:2]
