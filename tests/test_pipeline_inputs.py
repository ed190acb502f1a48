"""Bad samplesheets and bad params stop the pipeline before any task runs, with one line that
says where (file and line, or the param), what is wrong and how to fix it.

The messages of all cases come from one launch of tests/nextflow/input_checks.nf (the
pipeline's own parser and validator); two end-to-end launches show that a failing check
exits non-zero before any task. Runs use -stub-run: a check that wrongly passed would
still not start real work.
"""

from __future__ import annotations

import json
import re

import pytest

from nf_utils import REPO, assert_ok, make_fake_inputs, run_nf, run_pipeline

pytestmark = pytest.mark.nextflow

HEADER = "sample,h5ad,species\n"

SHEETS = {
    # case: (samplesheet text, line number in the error, words the error must contain)
    "empty_file": ("", 1, "the file is empty"),
    "header_only": (HEADER, 2, "no datasets"),
    "missing_column": ("sample,h5ad\ns1,data/a.h5ad\n", 1, "missing required column 'species'"),
    "unknown_column": ("sample,h5ad,species,batch\ns1,data/a.h5ad,human,b1\n", 1, "unknown column 'batch'"),
    "extra_field": (HEADER + "s1,data/a.h5ad,human\ns2,data/a.h5ad,human,extra\n", 3,
                    "4 fields but the header has 3"),
    "missing_field": (HEADER + "s1,data/a.h5ad\n", 2, "missing value for column 'species'"),
    "duplicate_sample": (HEADER + "s1,data/a.h5ad,human\n\ns1,data/b.h5ad,mouse\n", 4,
                         "duplicate sample 's1' (first on line 2)"),
    "missing_file": (HEADER + "s1,data/a.h5ad,human\ns2,data/nope.h5ad,human\n", 3, "h5ad file not found"),
    "bad_species": (HEADER + "s1,data/a.h5ad,Homo sapiens\n", 2, "species 'Homo sapiens' is not a valid species"),
    "bad_sample_id": (HEADER + "s 1,data/a.h5ad,human\n", 2, "may only contain letters"),
}

PARAMS = {
    # case: (extra args, words the error must contain)
    "type": (["--batch_size", "abc"], "--batch_size expects a whole number, got 'abc'"),
    "enum": (["--compat", "fast"], "--compat must be one of none, reference, got 'fast'"),
    "range": (["--shard_size", "0"], "--shard_size must be >= 1, got 0"),
    "pack_range": (["--embed_pack_cells", "-1"], "--embed_pack_cells must be >= 0, got -1"),
    "pack_type": (["--embed_pack_cells", "1e5"], "--embed_pack_cells expects a whole number, got '1e5'"),
    "boolean": (["--filter", "maybe"], "--filter expects true or false"),
    "missing_dir": (["--model_dir", "/nonexistent/model_files"], "--model_dir '/nonexistent/model_files': directory not found"),
    "missing_model": (["--model", "33l_8ep_1024t_1280.torch"], "--model '33l_8ep_1024t_1280.torch': not found in --model_dir"),
}


def assert_failed_before_tasks(r, root) -> str:
    assert r.returncode != 0, r.stdout
    assert "Submitted process" not in r.stdout, r.stdout
    work = root / "work"
    assert not work.exists() or not any(p.is_dir() for p in work.iterdir()), "no task may have run"
    return r.stdout


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """Every case above through the pipeline's own parser/validator, in one Nextflow launch
    (tests/nextflow/input_checks.nf). Returns {case: message or 'OK ...'}."""
    root = tmp_path_factory.mktemp("inputs")
    sheet, models = make_fake_inputs(root)
    sheets = {}
    for case, (text, _, _) in SHEETS.items():
        sheets[case] = str(root / f"{case}.csv")
        (root / f"{case}.csv").write_text(text)
    sheets["good_sheet"] = str(sheet)
    schema = json.loads((REPO / "nextflow_schema.json").read_text())
    base = {k: v["default"] for g in schema["$defs"].values() for k, v in g["properties"].items() if "default" in v}
    base.update(input=str(sheet), model_dir=str(models), trace_report_suffix="x")
    params = {case: {**base, **dict(zip(args[::2], args[1::2]))} for case, (args, _) in PARAMS.items()}
    params = {case: {k.lstrip("-"): v for k, v in p.items()} for case, p in params.items()}
    params["good"] = base
    params["typo"] = {**base, "shardsize": "10"}
    cases = root / "cases.json"
    cases.write_text(json.dumps({"schema": str(REPO / "nextflow_schema.json"), "samplesheets": sheets,
                                 "params": params}))
    r = run_nf(["run", str(REPO / "tests" / "nextflow" / "input_checks.nf"), "-ansi-log", "false",
                "--cases", str(cases)], cwd=root, timeout=600)
    assert_ok(r)
    found = dict(re.findall(r"^CASE (\S+) (.*)$", r.stdout, re.M))
    assert set(found) == set(sheets) | set(params), r.stdout
    return found, r.stdout


@pytest.mark.parametrize("case", list(SHEETS))
def test_bad_samplesheet(case, checked):
    found, _ = checked
    _, line_no, words = SHEETS[case]
    msg = found[case]
    # one line: file, line number and the explanation together
    assert re.fullmatch(rf"ERROR Samplesheet error: .*{case}\.csv line {line_no}: .*{re.escape(words)}.*", msg), msg


def test_good_samplesheet(checked):
    assert checked[0]["good_sheet"] == "OK 3"


@pytest.mark.parametrize("case", list(PARAMS))
def test_bad_param(case, checked):
    found, _ = checked
    msg = found[case]
    assert msg.startswith("ERROR Invalid parameter: ") and PARAMS[case][1] in msg, msg


def test_good_params_and_typo_error(checked):
    found, _ = checked
    assert found["good"] == "OK"
    assert found["typo"].startswith("ERROR Invalid parameter: --shardsize: unknown parameter; did you mean --shard_size?")


# End to end: the same checks stop a real launch with a non-zero exit before any task.
def test_bad_samplesheet_stops_run(tmp_path):
    _, models = make_fake_inputs(tmp_path)
    sheet = tmp_path / "dup.csv"
    sheet.write_text(SHEETS["duplicate_sample"][0])
    r = run_pipeline(tmp_path, "-stub-run", "--input", str(sheet), "--model_dir", str(models),
                     "--outdir", str(tmp_path / "out"))
    out = assert_failed_before_tasks(r, tmp_path)
    lines = [ln for ln in out.splitlines() if "Samplesheet error" in ln]
    assert lines and re.search(r"dup\.csv line 4: duplicate sample 's1'", lines[0]), out


def test_bad_param_stops_run(tmp_path):
    sheet, models = make_fake_inputs(tmp_path)
    r = run_pipeline(tmp_path, "-stub-run", "--input", str(sheet), "--model_dir", str(models),
                     "--outdir", str(tmp_path / "out"), "--compat", "fast")
    out = assert_failed_before_tasks(r, tmp_path)
    assert "Invalid parameter: --compat must be one of none, reference, got 'fast'" in out


def test_relative_paths_resolve_against_samplesheet(tmp_path):
    """h5ad paths relative to the samplesheet's folder work from any launch directory; the
    checked samplesheet records them resolved."""
    sheet, models = make_fake_inputs(tmp_path / "project")
    launch = tmp_path / "elsewhere"
    r = run_pipeline(launch, "-stub-run", "--input", str(sheet), "--model_dir", str(models),
                     "--outdir", str(tmp_path / "out"))
    assert_ok(r)
    valid = (tmp_path / "out" / "pipeline_info" / "samplesheet.valid.csv").read_text().splitlines()
    data = tmp_path / "project" / "data"
    assert valid == ["sample,h5ad,species", f"human_a,{data / 'a.h5ad'},human", f"human_b,{data / 'a.h5ad'},human",
                     f"mouse_c,{data / 'b.h5ad'},mouse"]
