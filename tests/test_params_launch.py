"""Launch-time behaviour of the pipeline's params (issue 10): unknown and dashed params,
every bad value at once, --help <param>, no files left by a failed check, resource caps for
the local executor only, retried exit codes, the warning for an outdir that holds another
run's results, and the chrom_token_offset pass-through.

Many param sets go through the pipeline's own validator in one launch of
tests/nextflow/input_checks.nf; the rest are real `nextflow run` launches (-stub-run where
the work itself does not matter).
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest

from nf_utils import (MODEL_DIR, REPO, assert_ok, ensure_demo, fake_slurm, make_fake_inputs, read_trace,
                      requires_engine, run_nf, simple_name)

pytestmark = pytest.mark.nextflow

# What the local executor may hand out on this machine (Java's availableProcessors follows
# the CPU affinity mask as nproc does).
MACHINE_CPUS = len(os.sched_getaffinity(0))
MACHINE_MEM = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

SEVEN_BAD = {"batch_size": "abc", "compat": "fast", "shard_size": 0, "filter": "maybe", "seed": -5,
             "precision": "fp16", "chrom_token_offset": -1}


def schema_defaults() -> dict:
    schema = json.loads((REPO / "nextflow_schema.json").read_text())
    return {k: v["default"] for g in schema["$defs"].values() for k, v in g["properties"].items() if "default" in v}


def error_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("Invalid parameter: ")]


def snapshot(root: Path) -> dict:
    """Every path under root, files with size and mtime (None when root does not exist).
    Folder mtimes are left out: the trace file Nextflow creates at launch, and removes again
    after a failed check, touches its folder."""
    if not root.exists():
        return None
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def launch(cwd: Path, *args: str, timeout: int = 600):
    """`nextflow run <repo>` without -profile test (what a user types), work dir in cwd."""
    return run_nf(["run", str(REPO), "-ansi-log", "false", "-w", str(cwd / "work"), *args], cwd=cwd, timeout=timeout)


def assert_no_task(r) -> None:
    assert r.returncode != 0, r.stdout
    assert "Submitted process" not in r.stdout, r.stdout
    assert "Traceback" not in r.stdout and "Exception" not in r.stdout, r.stdout


def mem_bytes(text: str) -> float:
    num, unit = text.split()
    return float(num) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}[unit]


# ----------------------------------------------------------------------------------------
# Many param sets, one launch of the validator harness
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    root = tmp_path_factory.mktemp("params")
    sheet, models = make_fake_inputs(root)
    spaced = root / "my data"
    (spaced / "data").mkdir(parents=True)
    (spaced / "data" / "a b.h5ad").touch()
    (spaced / "sheet one.csv").write_text("sample,h5ad,species\ns1,data/a b.h5ad,human\n")
    (spaced / "sheet one.txt").write_text("sample,h5ad,species\n")
    base = {**schema_defaults(), "input": str(sheet), "model_dir": str(models), "trace_report_suffix": "x"}
    sets = {
        "good": {},
        # a params file keeps `batch-size`; the command line of Nextflow 24.10 makes it `batchSize`
        "dashed": {"batch-size": 10},
        "camel": {"batchSize": 10},
        "typo": {"batchsize": 10},
        "typo_near": {"shard_sise": 10},
        "far": {"qqq_zzz_www": 1},
        "retired": {"max_cpus": 8},
        "seven_bad": SEVEN_BAD,
        "compat_auto": {"compat": "reference", "batch_size": 0},
        "compat_auto_str": {"compat": "reference", "batch_size": "0"},
        "default_auto": {"compat": "none", "batch_size": 0},
        "seed_neg": {"seed": -5},
        "seed_big": {"seed": 4294967296},
        "seed_big_str": {"seed": "4294967296"},
        "seed_huge": {"seed": 1e20},           # the CLI turns 99999999999999999999 into a Double
        "seed_max": {"seed": 4294967295},
        "space_input": {"input": str(spaced / "sheet one.csv")},
        "not_csv": {"input": str(spaced / "sheet one.txt")},
        "chrom_offset": {"chrom_token_offset": 143574},
        "chrom_offset_neg": {"chrom_token_offset": -1},
        "chrom_offset_word": {"chrom_token_offset": "auto"},
    }
    cases = root / "cases.json"
    cases.write_text(json.dumps({
        "schema": str(REPO / "nextflow_schema.json"),
        "samplesheets": {"space_sheet": str(spaced / "sheet one.csv")},
        "params": {name: {**base, **extra} for name, extra in sets.items()},
        "help": {"help_batch_size": "batch_size", "help_compat": "compat", "help_seed": "seed",
                 "help_unknown": "batchsize"},
    }))
    r = run_nf(["run", str(REPO / "tests" / "nextflow" / "input_checks.nf"), "-ansi-log", "false",
                "--cases", str(cases)], cwd=root, timeout=600)
    assert_ok(r)
    found = dict(re.findall(r"^CASE (\S+) (.*)$", r.stdout, re.M))
    assert len(found) == len(sets) + 5, r.stdout
    return found


def errors_of(found: dict, case: str) -> list[str]:
    msg = found[case]
    assert msg.startswith("ERROR "), f"{case}: {msg}"
    lines = msg[len("ERROR "):].split(" || ")
    for ln in lines:
        assert ln.startswith("Invalid parameter: --"), ln
    return [ln[len("Invalid parameter: "):] for ln in lines]


@pytest.mark.parametrize("case, flag, suggestion", [
    ("dashed", "--batch-size", "--batch_size"),
    ("camel", "--batchSize", "--batch_size"),
    ("typo", "--batchsize", "--batch_size"),
    ("typo_near", "--shard_sise", "--shard_size"),
])
def test_unknown_param_is_an_error_with_suggestion(checked, case, flag, suggestion):
    (line,) = errors_of(checked, case)
    assert line.startswith(f"{flag}: unknown parameter; did you mean {suggestion}?"), line


def test_unknown_param_without_near_name(checked):
    (line,) = errors_of(checked, "far")
    assert line.startswith("--qqq_zzz_www: unknown parameter; see --help"), line


def test_retired_nf_core_param_points_to_resource_limits(checked):
    (line,) = errors_of(checked, "retired")
    assert line.startswith("--max_cpus: not a parameter of this pipeline") and "process.resourceLimits" in line


def test_every_bad_value_reported(checked):
    lines = errors_of(checked, "seven_bad")
    assert len(lines) == 7, lines
    assert {ln.split()[0] for ln in lines} == {f"--{k}" for k in SEVEN_BAD}


@pytest.mark.parametrize("case", ["compat_auto", "compat_auto_str"])
def test_compat_needs_explicit_batch_size(checked, case):
    assert errors_of(checked, case) == [
        "--batch_size 0 (auto) works only with --compat none; in compat mode pass the reference's batch size, "
        "e.g. --batch_size 25"]


@pytest.mark.parametrize("case, shown", [("seed_neg", "-5"), ("seed_big", "4294967296"),
                                         ("seed_big_str", "4294967296"),
                                         ("seed_huge", "100000000000000000000")])
def test_seed_range_one_line(checked, case, shown):
    assert errors_of(checked, case) == [
        f"--seed must be between 0 and 4294967295, got {shown}; pass a value in that range (default: 0)"]


def test_samplesheet_path_with_space(checked):
    assert checked["space_input"] == "OK"
    assert checked["space_sheet"] == "OK 1"
    (line,) = errors_of(checked, "not_csv")
    assert line.startswith("--input '") and "must be a CSV file whose name ends in .csv" in line, line


def test_chrom_token_offset_param(checked):
    assert checked["chrom_offset"] == "OK"
    assert errors_of(checked, "chrom_offset_neg") == [
        "--chrom_token_offset must be >= 0, got -1; pass a larger value"]
    (line,) = errors_of(checked, "chrom_offset_word")
    assert line.startswith("--chrom_token_offset expects a whole number, got 'auto'")


def test_good_sets(checked):
    for case in ("good", "default_auto", "seed_max"):
        assert checked[case] == "OK", (case, checked[case])


def test_param_help_text(checked):
    text = checked["help_batch_size"]
    assert text.startswith("HELP --batch_size  [integer]  (Embedding)")
    assert "Cells per forward batch" in text and "the reference's 25" in text and "minimum: 0" in text
    assert "choices: none, reference" in checked["help_compat"] and "default: none" in checked["help_compat"]
    assert "range: 0 .. 4294967295" in checked["help_seed"]
    assert checked["help_unknown"] == "HELP null"


# ----------------------------------------------------------------------------------------
# Real launches
# ----------------------------------------------------------------------------------------
def test_dashed_cli_param_and_all_errors_at_launch_leave_outdir_unchanged(tmp_path):
    """`--batch-size 10` on the command line is an error (not 25 in silence); with six more bad
    values from a params file all seven come in one launch, and the outdir, which holds an
    earlier run's results, is left exactly as it was (no trace file, no params json)."""
    sheet, models = make_fake_inputs(tmp_path)
    out = tmp_path / "out"
    (out / "pipeline_info").mkdir(parents=True)
    (out / "pipeline_info" / "params_earlier.json").write_text('{"seed": 0}\n')
    (out / "pipeline_info" / "execution_trace_earlier.txt").write_text("task_id\n")
    (out / "s1").mkdir()
    (out / "s1" / "s1_uce_adata.h5ad").write_text("earlier")
    before = snapshot(out)
    bad = {k: v for k, v in SEVEN_BAD.items() if k != "batch_size"}
    params_file = tmp_path / "bad.json"
    params_file.write_text(json.dumps(bad))
    r = launch(tmp_path, "-stub-run", "--input", str(sheet), "--model_dir", str(models), "--outdir", str(out),
               "-params-file", str(params_file), "--batch-size", "10")
    assert_no_task(r)
    lines = error_lines(r.stdout)
    assert len(lines) == 7, r.stdout
    assert ("Invalid parameter: --batch-size: unknown parameter; did you mean --batch_size? "
            "(parameters are spelled with underscores)") in lines
    assert {ln.split()[2].rstrip(":") for ln in lines} == {f"--{k}" for k in bad} | {"--batch-size"}
    assert snapshot(out) == before


def test_compat_batch_size_zero_fails_at_launch(tmp_path):
    """One line at launch, not a ZeroDivisionError in SENTENCES; no outdir is created."""
    sheet, models = make_fake_inputs(tmp_path)
    out = tmp_path / "out"
    r = launch(tmp_path, "-stub-run", "--input", str(sheet), "--model_dir", str(models), "--outdir", str(out),
               "--compat", "reference", "--batch_size", "0")
    assert_no_task(r)
    assert error_lines(r.stdout) == [
        "Invalid parameter: --batch_size 0 (auto) works only with --compat none; in compat mode pass the "
        "reference's batch size, e.g. --batch_size 25"], r.stdout
    assert not out.exists(), snapshot(out)


def test_samplesheet_error_leaves_no_outdir(tmp_path):
    _, models = make_fake_inputs(tmp_path)
    sheet = tmp_path / "dup.csv"
    sheet.write_text("sample,h5ad,species\ns1,data/a.h5ad,human\ns1,data/b.h5ad,human\n")
    out = tmp_path / "out"
    r = launch(tmp_path, "-stub-run", "--input", str(sheet), "--model_dir", str(models), "--outdir", str(out))
    assert_no_task(r)
    assert "dup.csv line 3: duplicate sample 's1'" in r.stdout, r.stdout
    assert not out.exists(), snapshot(out)


def test_help_param_prints_and_exits(tmp_path):
    r = run_nf(["run", str(REPO), "-ansi-log", "false", "--help", "compat"], cwd=tmp_path, timeout=300)
    assert_ok(r)
    assert "--compat  [string]  (Embedding)" in r.stdout
    assert "choices: none, reference" in r.stdout and "default: none" in r.stdout
    assert "reproduce the reference implementation" in r.stdout
    assert "Submitted process" not in r.stdout and "Invalid parameter" not in r.stdout
    assert not (tmp_path / "results").exists(), "--help <param> must not write reports"


@pytest.fixture(scope="module")
def spaced_runs(tmp_path_factory):
    """Stub runs without -profile test from a folder with a space in its name: seed 0 (3
    datasets), then seed 1 with 2 of them into the same outdir, then seed 1 again (-resume)."""
    root = tmp_path_factory.mktemp("spaced") / "my project"
    sheet, models = make_fake_inputs(root)
    two = root / "two samples.csv"
    two.write_text("\n".join(sheet.read_text().splitlines()[:3]) + "\n")
    spaced_sheet = root / "sample sheet.csv"
    sheet.rename(spaced_sheet)
    out = root / "out"
    common = ["-stub-run", "--model_dir", str(models), "--outdir", str(out)]
    runs = [launch(root, *common, "--input", str(spaced_sheet), "--trace_report_suffix", "one")]
    runs.append(launch(root, *common, "--input", str(two), "--seed", "1", "--trace_report_suffix", "two"))
    runs.append(launch(root, *common, "--input", str(two), "--seed", "1", "--trace_report_suffix", "three",
                       "-resume"))
    return out, runs


def test_samplesheet_path_with_space_runs(spaced_runs):
    out, runs = spaced_runs
    assert_ok(runs[0])
    assert (out / "human_a" / "human_a_uce_adata.h5ad").exists()
    assert "WARN: --outdir" not in runs[0].stdout


def test_local_requests_capped_to_machine(spaced_runs):
    """No -profile test: the labels ask for up to 6 CPUs / 36 GB; the local executor gets at
    most what this machine has instead of failing with 'Process requirement exceeds...'."""
    out, _ = spaced_runs
    rows = read_tsv(out / "pipeline_info" / "previous_one" / "execution_trace_one.txt")
    assert rows and {r["status"] for r in rows} == {"COMPLETED"}
    for r in rows:
        # the trace rounds memory to 3 digits
        assert int(r["cpus"]) <= MACHINE_CPUS and mem_bytes(r["memory"]) <= MACHINE_MEM * 1.01, r
    sentences = [r for r in rows if simple_name(r) == "SENTENCES"]   # process_medium: 6 CPUs, 36 GB
    assert {int(r["cpus"]) for r in sentences} == {min(6, MACHINE_CPUS)}
    mem = mem_bytes(sentences[0]["memory"])
    assert mem == 36 * 2**30 if MACHINE_MEM >= 36 * 2**30 else mem >= 0.99 * MACHINE_MEM, sentences[0]


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_rerun_with_other_params_warns_and_keeps_runs_apart(spaced_runs):
    out, runs = spaced_runs
    assert_ok(runs[1])
    warn = runs[1].stdout[runs[1].stdout.index("WARN: --outdir"):]
    assert "earlier run (one) with other parameters:" in warn and "seed 0 (now 1)" in warn
    assert "input " in warn, "the samplesheet changed too"
    for replaced in ("human_a/human_a_uce_adata.h5ad", "human_b/human_b_uce_adata.h5ad", "report/"):
        assert replaced in warn.splitlines()[1], warn
    assert "mouse_c/" in warn.splitlines()[2] and "Kept from the earlier run" in warn.splitlines()[2]
    assert "moved to pipeline_info/previous_one/" in warn
    info = out / "pipeline_info"
    old = info / "previous_one"
    assert json.loads((old / "params_one.json").read_text())["seed"] == 0
    for name in ("execution_trace_one.txt", "execution_report_one.html", "samplesheet.valid.csv",
                 "software_versions.yml", "validated.json"):
        assert (old / name).is_file(), name
    assert not list(info.glob("*_one.*")), "pipeline_info/ holds one configuration"
    assert json.loads((info / "params_two.json").read_text())["seed"] == 1
    assert (info / "samplesheet.valid.csv").read_text().count("\n") == 3  # header + 2 samples


def test_rerun_with_same_params_is_quiet(spaced_runs):
    out, runs = spaced_runs
    assert_ok(runs[2])
    assert "WARN: --outdir" not in runs[2].stdout
    info = out / "pipeline_info"
    assert (info / "params_two.json").is_file() and (info / "params_three.json").is_file()
    assert not (info / "previous_two").exists()


def test_slurm_requests_not_capped(tmp_path):
    """process.executor = 'slurm' in the user's own -c config: the head node's size does not
    cap the requests (sbatch/squeue are stand-ins that run the job locally)."""
    sheet, models = make_fake_inputs(tmp_path)
    path = fake_slurm(tmp_path)
    user = tmp_path / "user.config"
    user.write_text("process.executor = 'slurm'\nexecutor {\n    pollInterval = '200ms'\n"
                    "    queueStatInterval = '1s'\n}\n")
    out = tmp_path / "out"
    r = run_nf(["run", str(REPO), "-ansi-log", "false", "-w", str(tmp_path / "work"), "-stub-run", "-c", str(user),
                "--input", str(sheet), "--model_dir", str(models), "--outdir", str(out), "--trace_report_suffix", "s"],
               cwd=tmp_path, timeout=600, PATH=path)
    assert_ok(r)
    rows = read_trace(out, "s")
    got = {(simple_name(r), r["cpus"], r["memory"]) for r in rows}
    assert ("SENTENCES", "6", "36 GB") in got and ("EMBED", "4", "32 GB") in got, got
    args = [p.read_text() for p in (tmp_path / "work").glob("*/*/.sbatch_args")]
    assert any("#SBATCH -c 6\n" in a and "#SBATCH --mem 36864M" in a for a in args), args


def test_retried_exit_codes_and_chrom_token_offset(tmp_path):
    """Under the pipeline's config: nf-core's retry set (SIGTERM 143 from preemption included)
    is retried once, exit 1 is not; --chrom_token_offset reaches SPECIES_VOCAB's ext.args."""
    codes = [130, 137, 140, 143, 145, 104, 175]
    out = tmp_path / "out"
    r = run_nf(["run", str(REPO / "tests" / "nextflow" / "config_probe.nf"), "-ansi-log", "false",
                "-c", str(REPO / "nextflow.config"), "--outdir", str(out), "--trace_report_suffix", "p",
                "--chrom_token_offset", "143574", "--retry_codes", ",".join(map(str, codes))],
               cwd=tmp_path, timeout=300)
    assert r.returncode != 0, "LAST fails on purpose"
    assert "ARGS human --chrom-token-offset 143574" in r.stdout, r.stdout
    rows = read_trace(out, "p")
    retry = {(int(x["tag"]), int(x["attempt"]), x["status"]) for x in rows if x["process"] == "RETRY"}
    assert retry == {(c, 1, "FAILED") for c in codes} | {(c, 2, "COMPLETED") for c in codes}, retry
    assert [(x["attempt"], x["status"]) for x in rows if x["process"] == "LAST"] == [("1", "FAILED")]


def test_chrom_token_offset_unset_passes_nothing(tmp_path):
    r = run_nf(["run", str(REPO / "tests" / "nextflow" / "config_probe.nf"), "-ansi-log", "false",
                "-c", str(REPO / "nextflow.config"), "--outdir", str(tmp_path / "out")], cwd=tmp_path, timeout=300)
    assert_ok(r)
    assert re.search(r"^ARGS human$", r.stdout, re.M) and "--chrom-token-offset" not in r.stdout, r.stdout


@pytest.mark.slow
@requires_engine
def test_plain_run_on_this_machine(tmp_path):
    """The issue's command, no -profile test: the demo completes on a 2-core machine."""
    ensure_demo()
    out = tmp_path / "out"
    r = launch(tmp_path, "--input", str(REPO / "assets" / "samplesheet_test.csv"), "--model_dir", str(MODEL_DIR),
               "--outdir", str(out), "--trace_report_suffix", "plain", timeout=900)
    assert_ok(r)
    assert (out / "pbmc_demo" / "pbmc_demo_uce_adata.h5ad").is_file()
    for row in read_trace(out, "plain"):
        assert row["status"] == "COMPLETED" and int(row["cpus"]) <= MACHINE_CPUS, row
