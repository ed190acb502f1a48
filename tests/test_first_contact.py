"""A new user's first runs (issue 10): typed provenance, seeds and batch sizes checked up front,
errors that name the real cause (the min_cells filter, NaN/inf, an empty file), and `uce` on PATH
after the README's set-up. Real h5ad files through the real commands."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from conftest import PBMC, ROOT, make_edge_dataset, run_uce

STAGE_CODE = 2  # user errors: one line, exit status 2
AUTO_BATCH = "--batch-size 0 (auto) works only with --compat none; pass the reference's batch size, e.g. 25"


def invoke(*args) -> tuple[int, str]:
    from uce_nf.cli import main
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def error_lines(out: str) -> list[str]:
    return [l for l in out.splitlines() if l.startswith("ERROR") or l.startswith("Error")]


@pytest.fixture(scope="module")
def small(tmp_path_factory, model_dir):
    """A 60-cell edge dataset, its species file and processed files (for sentences/embed)."""
    d = tmp_path_factory.mktemp("first_contact")
    h5ad = make_edge_dataset(d / "small.h5ad", n_cells=60)
    run_uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--output", d / "h.pt")
    run_uce("preprocess", "--input", h5ad, "--species-file", d / "h.pt", "--output", d / "p.h5ad", "--stats", d / "s.json")
    run_uce("index", "--adata", d / "p.h5ad", "--species-file", d / "h.pt", "--output", d / "i.npz")
    return d


def pbmc(n: int) -> ad.AnnData:
    return ad.read_h5ad(PBMC)[:n].copy()


# ---------------------------------------------------------------- 1. uns['uce'] keeps its types
def leaves(d: dict, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_uns_uce_numbers_and_booleans_are_typed(small, model_dir, tmp_path):
    out = tmp_path / "small_uce_adata.h5ad"
    run_uce("run", "--input", small / "small.h5ad", "--species", "human", "--model-dir", model_dir, "--workers", 1,
            "--seed", 7, "--output", out)
    u = ad.read_h5ad(out).uns["uce"]
    for key in ("seed", "batch_size", "nlayers", "n_shards"):
        assert isinstance(u[key], (int, np.integer)) and not isinstance(u[key], (bool, np.bool_)), (key, u[key])
    assert u["seed"] == 7 and u["batch_size"] == 0  # default mode without --batch-size: a token budget
    assert isinstance(u["embed_seconds"], (float, np.floating))
    p = u["preprocess"]
    assert isinstance(p["filter"], (bool, np.bool_)) and bool(p["filter"]) is True
    for key in ("min_cells", "min_genes", "cells_in", "cells_kept", "genes_kept"):
        assert isinstance(p[key], (int, np.integer)), (key, p[key])
    assert isinstance(p["seconds"], (float, np.floating))
    # no leaf is a number or a boolean spelled as a string
    for key, v in leaves(u):
        if isinstance(v, str):
            assert v not in ("True", "False") and not v.lstrip("-").replace(".", "", 1).isdigit(), (key, v)


def test_uns_uce_lists_and_arrays_keep_their_types(small, tmp_path):
    """Lists of numbers/booleans stay numeric arrays (they were written as strings: '25', 'True'),
    0-d arrays (np.load of a scalar) become scalars, nested dicts keep their types too."""
    from uce_nf.io import save_npz
    from uce_nf.output import open_shards, write_merged
    n = ad.read_h5ad(small / "p.h5ad", backed="r").n_obs
    emb = np.zeros((n, 4), np.float32)
    emb[:, 0] = 1
    save_npz(tmp_path / "s.embeddings.npz", embeddings=emb, cell_index=np.arange(n))
    prov = {"seed": 0, "batch_sizes": [25, 50], "flags": [True, False], "fractions": [0.5, 1],
            "device_index": np.array(3), "nested": {"filter": True, "min_cells": 10, "deeper": {"sizes": [1, 2]}},
            "names": ["a", "b"], "unset": None}
    write_merged(small / "p.h5ad", open_shards([tmp_path / "s.embeddings.npz"]), prov, tmp_path / "o.h5ad")
    u = ad.read_h5ad(tmp_path / "o.h5ad").uns["uce"]
    assert np.issubdtype(u["batch_sizes"].dtype, np.integer) and list(u["batch_sizes"]) == [25, 50]
    assert u["flags"].dtype == bool and list(u["flags"]) == [True, False]
    assert np.issubdtype(u["fractions"].dtype, np.floating)
    assert isinstance(u["device_index"], (int, np.integer)) and u["device_index"] == 3
    assert isinstance(u["nested"]["filter"], (bool, np.bool_)) and isinstance(u["nested"]["min_cells"], (int, np.integer))
    assert np.issubdtype(u["nested"]["deeper"]["sizes"].dtype, np.integer)
    assert list(u["names"]) == ["a", "b"] and "unset" not in u


# ---------------------------------------------------------------- 2. seed and batch size
@pytest.mark.parametrize("seed", ["-5", str(2**32)])
def test_seed_out_of_range_is_a_usage_error(small, seed):
    """One range everywhere: the pipeline schema's 0..2**32-1 (numpy's RandomState range)."""
    for compat in ("none", "reference"):
        code, out = invoke("sentences", "--adata", small / "p.h5ad", "--index", small / "i.npz", "--seed", seed,
                           "--compat", compat, "--output-dir", small / "x", "--name", "x", "--workers", 1)
        assert code == STAGE_CODE, out
        assert "Traceback" not in out and error_lines(out) == [
            f"Error: Invalid value for '--seed': {seed} is not in the range 0<=x<=4294967295."], out


def test_seed_range_matches_the_pipeline_schema(small):
    schema = json.loads((ROOT / "nextflow_schema.json").read_text())
    seed = next(g["properties"]["seed"] for g in schema.get("$defs", schema.get("definitions", {})).values()
                if "seed" in g.get("properties", {}))
    assert (seed["minimum"], seed["maximum"]) == (0, 2**32 - 1)
    run_uce("sentences", "--adata", small / "p.h5ad", "--index", small / "i.npz", "--seed", 2**32 - 1,
            "--compat", "reference", "--output-dir", small / "maxseed", "--name", "m")


def test_auto_batch_size_needs_default_mode(small, model_dir, tmp_path):
    shard = small / "bs.shard-00000.sentences.npz"
    run_uce("sentences", "--adata", small / "p.h5ad", "--index", small / "i.npz", "--output-dir", small,
            "--name", "bs", "--workers", 1)
    cases = {
        "sentences": ["sentences", "--adata", small / "p.h5ad", "--index", small / "i.npz", "--output-dir", tmp_path,
                      "--name", "s"],
        "embed": ["embed", "--sentences", shard, "--species-file", small / "h.pt", "--model-dir", model_dir,
                  "--output", tmp_path / "e.npz"],
        "run": ["run", "--input", small / "small.h5ad", "--model-dir", model_dir, "--output", tmp_path / "r.h5ad"],
    }
    for name, args in cases.items():
        code, out = invoke(*args, "--compat", "reference", "--batch-size", 0)
        assert code == STAGE_CODE, (name, out)
        assert out.strip() == f"ERROR: {AUTO_BATCH}", (name, out)
    assert not list(tmp_path.iterdir())  # nothing was started


def test_engine_refuses_auto_batch_in_compat(small, tmp_path):
    from uce_nf.io import UserError
    from uce_nf.sentences import write_sentences
    from uce_nf.tokens import load_index
    with pytest.raises(UserError, match="works only with --compat none"):
        write_sentences(small / "p.h5ad", load_index(small / "i.npz"), tmp_path, "x", compat=True, batch_size=0)


# ---------------------------------------------------------------- 3. the filter names itself
def validate(h5ad: Path, model_dir: Path, out: Path, *extra) -> tuple[int, str, dict]:
    code, text = invoke("validate", "--input", h5ad, "--species", "human", "--model-dir", model_dir,
                        "--output", out, *extra)
    return code, text, json.loads(out.read_text()) if out.exists() else {}


def preprocess(small: Path, h5ad: Path, tmp_path: Path, *extra) -> tuple[int, str]:
    return invoke("preprocess", "--input", h5ad, "--species-file", small / "h.pt", "--output", tmp_path / "p.h5ad",
                  "--stats", tmp_path / "s.json", *extra)


def names_filter_fix(line: str, setting: str) -> bool:
    return (f"{setting}=" in line and f"--{setting}" in line and f"--{setting.replace('_', '-')}" in line
            and "--filter false" in line and "--no-filter" in line)


def test_five_cells_name_min_cells(small, model_dir, tmp_path):
    pbmc(5).write_h5ad(tmp_path / "five.h5ad")
    code, out, summary = validate(tmp_path / "five.h5ad", model_dir, tmp_path / "v.json")
    assert code == STAGE_CODE and len(error_lines(out)) == 1, out
    line = error_lines(out)[0]
    assert "5 cells but min_cells=10" in line and names_filter_fix(line, "min_cells"), line
    assert "genes match" not in line
    assert summary["error"] == line.removeprefix("ERROR: ")  # what the pipeline reports
    code, out = preprocess(small, tmp_path / "five.h5ad", tmp_path)
    assert code == STAGE_CODE and "5 cells but min_cells=10" in out and names_filter_fix(out, "min_cells"), out
    # the settings are honoured: no filter, or a min_cells the file can meet, passes VALIDATE
    assert validate(tmp_path / "five.h5ad", model_dir, tmp_path / "v2.json", "--no-filter")[0] == 0
    assert validate(tmp_path / "five.h5ad", model_dir, tmp_path / "v3.json", "--min-cells", 5)[0] == 0


def test_filter_leaving_too_few_genes_names_min_cells(small, tmp_path):
    pbmc(5).write_h5ad(tmp_path / "five.h5ad")
    code, out = preprocess(small, tmp_path / "five.h5ad", tmp_path, "--min-cells", 5)  # genes in all 5 cells
    assert code == STAGE_CODE and len(error_lines(out)) == 1, out
    assert "the min_cells filter left" in out and names_filter_fix(out, "min_cells"), out


def test_filter_leaving_no_cells_names_min_genes(small, tmp_path):
    pbmc(60).write_h5ad(tmp_path / "pbmc60.h5ad")
    code, out = preprocess(small, tmp_path / "pbmc60.h5ad", tmp_path, "--min-cells", 1, "--min-genes", 5000)
    assert code == STAGE_CODE and len(error_lines(out)) == 1, out
    assert "no cells left after filtering" in out and names_filter_fix(out, "min_genes"), out


def test_fewer_genes_than_min_genes_caught_by_validate(model_dir, tmp_path):
    a = pbmc(40)
    a = a[:, :150].copy()
    a.write_h5ad(tmp_path / "narrow.h5ad")
    code, out, _ = validate(tmp_path / "narrow.h5ad", model_dir, tmp_path / "v.json", "--min-genes", 200)
    assert code == STAGE_CODE and "150 genes but min_genes=200" in out and names_filter_fix(out, "min_genes"), out


# ---------------------------------------------------------------- 4. NaN/inf, empty files
def with_nonfinite(a: ad.AnnData, cells: dict[int, float]) -> ad.AnnData:
    X = a.X.toarray().astype(np.float32)
    for i, v in cells.items():
        X[i, 3] = v
    a.X = sp.csr_matrix(X)
    return a


def test_nan_and_inf_are_named(small, model_dir, tmp_path):
    a = with_nonfinite(pbmc(50), {4: np.nan, 9: np.inf, 20: np.nan})
    a.write_h5ad(tmp_path / "nan.h5ad")
    first = f"cell 4 '{a.obs_names[4]}'"
    code, out, summary = validate(tmp_path / "nan.h5ad", model_dir, tmp_path / "v.json")
    assert code == STAGE_CODE and len(error_lines(out)) == 1, out
    assert "X has 3 NaN/inf values" in out and first in out and "negative or non-integer" not in out, out
    code, out = preprocess(small, tmp_path / "nan.h5ad", tmp_path)
    assert code == STAGE_CODE and "3 NaN/inf values" in out and first in out, out
    code, out = preprocess(small, tmp_path / "nan.h5ad", tmp_path, "--counts-layer", "X")
    assert code == STAGE_CODE and "3 NaN/inf values" in out and first in out, out


def test_nan_beyond_the_sampled_rows_counted_by_preprocess(small, model_dir, tmp_path):
    """VALIDATE samples the first 2,000 cells; PREPROCESS reads all and counts every NaN/inf."""
    parts = [pbmc(700) for _ in range(3)]
    for k, p in enumerate(parts):
        p.obs_names = [f"{n}-{k}" for n in p.obs_names]
    a = with_nonfinite(ad.concat(parts), {2050: np.nan, 2060: -np.inf, 2099: np.nan})
    a.write_h5ad(tmp_path / "late_nan.h5ad")
    assert validate(tmp_path / "late_nan.h5ad", model_dir, tmp_path / "v.json")[0] == 0
    code, out = preprocess(small, tmp_path / "late_nan.h5ad", tmp_path)
    assert code == STAGE_CODE and len(error_lines(out)) == 1, out
    assert "X has 3 NaN/inf values, the first in cell 2050" in out and a.obs_names[2050] in out, out


def test_zero_cell_file_stops_at_validate(model_dir, tmp_path):
    pbmc(10)[:0].copy().write_h5ad(tmp_path / "empty.h5ad")
    code, out, summary = validate(tmp_path / "empty.h5ad", model_dir, tmp_path / "v.json")
    assert code == STAGE_CODE and len(error_lines(out)) == 1, out
    assert "0 cells x 765 genes" in out and "empty" in summary["error"], out


# ---------------------------------------------------------------- 6. `uce` on PATH after set-up
def test_setup_puts_uce_on_path(tmp_path):
    cache = Path(os.environ.get("UCE_NF_CACHE", Path.home() / ".cache" / "uce-nf"))
    if not (cache / "venv" / "bin" / "python").exists():
        pytest.skip("scripts/setup.sh has not built the venv here (it would take minutes)")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("export PATH="))
    # a bare shell: only what the README's set-up gives, run from elsewhere
    env = {"HOME": str(Path.home()), "PATH": "/usr/bin:/bin"}
    if "UCE_NF_CACHE" in os.environ:
        env["UCE_NF_CACHE"] = os.environ["UCE_NF_CACHE"]
    for setup in (line, f"source {cache / 'env.sh'}"):
        v = subprocess.run(["bash", "-c", f"{setup} && uce --version && uce run --help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert v.returncode == 0, (setup, v.stdout, v.stderr)
        assert v.stdout.startswith("uce, version ") and "Usage: uce run" in v.stdout, v.stdout
    assert "env.sh" in (ROOT / "README.md").read_text()
