"""Static checks of the pipeline's code and config, no task run: every profile's config, the image
tag, the parameter schema, Nextflow's strict syntax, --help, and no in-place sort in workflow code."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from nf_utils import REPO, assert_ok, run_nf

pytestmark = pytest.mark.nextflow

PROFILES = {
    # profile(s) -> lines that `nextflow config -flat` must print
    "test": ["params.shard_size = 300", "process.resourceLimits"],
    "docker": ["docker.enabled = true", "docker.runOptions = '-u $(id -u):$(id -g)'", "podman.enabled = false"],
    "podman": ["podman.enabled = true", "docker.enabled = false"],
    "singularity": ["singularity.enabled = true", "singularity.autoMounts = true"],
    "apptainer": ["apptainer.enabled = true", "apptainer.autoMounts = true"],
    "gpu": ["process.'withLabel:process_gpu'.accelerator", "process.'withLabel:process_gpu'.containerOptions"],
    "slurm": ["process.executor = 'slurm'"],
    "awsbatch": ["process.executor = 'awsbatch'", "aws.region = 'us-east-1'"],
    "google": ["process.executor = 'google-batch'", "google.location = 'us-central1'"],
    "k8s": ["process.executor = 'k8s'", "k8s.namespace = 'default'"],
    "debug": ["dumpHashes = true"],
    "test,docker,gpu": ["docker.enabled = true", "process.'withLabel:process_gpu'.accelerator"],
}


@pytest.mark.parametrize("profile", list(PROFILES))
def test_config_parses(profile, tmp_path):
    r = run_nf(["config", str(REPO), "-flat", "-profile", profile], cwd=tmp_path, timeout=300)
    assert_ok(r)
    for line in PROFILES[profile]:
        assert line in r.stdout, f"-profile {profile}: '{line}' missing from:\n{r.stdout}"
    # same image for every process, tag = pipeline version
    assert "process.container = 'ghcr.io/uce-nf/uce-nf:0.1.0'" in r.stdout


def test_container_tag_follows_version():
    """Config settings cannot be read back under the strict syntax, so the image tag is a
    literal: keep it equal to manifest.version and the Python package version."""
    text = (REPO / "nextflow.config").read_text()
    manifest = re.search(r"^\s*version\s*=\s*'([^']+)'", text, re.M).group(1)
    tag = re.search(r"container_image\s*=\s*'[^':]+:([^']+)'", text).group(1)
    pyproject = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    schema = json.loads((REPO / "nextflow_schema.json").read_text())
    assert manifest == tag == pyproject
    assert schema["$defs"]["container_options"]["properties"]["container_image"]["default"].endswith(":" + manifest)


def test_schema_covers_every_param():
    """Every param of nextflow.config is documented in nextflow_schema.json, same default."""
    text = (REPO / "nextflow.config").read_text()
    block = text[text.index("params {"):text.index("\n}\n", text.index("params {"))]
    config = dict(re.findall(r"^\s{4}(\w+)\s*=\s*(.+?)\s*$", block, re.M))
    schema = json.loads((REPO / "nextflow_schema.json").read_text())
    props = {k: v for g in schema["$defs"].values() for k, v in g["properties"].items()}
    assert set(config) == set(props)
    for name, raw in config.items():
        if raw == "null" or raw.startswith("new "):
            assert "default" not in props[name], name
            continue
        value = json.loads(raw.replace("'", '"'))
        assert props[name].get("default") == value, name
        assert props[name]["type"] == {bool: "boolean", int: "integer", str: "string"}[type(value)], name


def test_strict_syntax():
    """Every script and config parses with Nextflow's strict parser (nf-lang)."""
    r = subprocess.run(["bash", str(REPO / "scripts" / "lint_nextflow.sh")], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 error(s)" in r.stdout


def test_help(tmp_path):
    r = run_nf(["run", str(REPO), "--help", "-ansi-log", "false"], cwd=tmp_path, timeout=300)
    assert_ok(r)
    for flag in ("--input", "--model_dir", "--shard_size", "--compat", "--precision", "--color_by"):
        assert flag in r.stdout
    assert "(none|reference)" in r.stdout
    assert not (tmp_path / "results").exists(), "--help must not write reports"


def test_no_in_place_sort_in_workflow_code():
    """Groovy's list.sort {} sorts in place. On a task's output list it races with Nextflow, which
    still iterates that list to publish it after binding: CI hit ConcurrentModificationException
    ("Unexpected error while finalizing task 'UCE:SENTENCES'") in test_many_datasets' stub run.
    All sorts in the workflow code copy: sort(false)."""
    bad = []
    for nf in [REPO / "main.nf", *REPO.glob("workflows/**/*.nf"), *REPO.glob("subworkflows/**/*.nf"),
               *REPO.glob("modules/**/*.nf")]:
        for n, line in enumerate(nf.read_text().splitlines(), 1):
            code = line.split("//")[0]
            if re.search(r"\.sort\s*(\{|\(\s*\)|\(\s*\{)", code):
                bad.append(f"{nf.relative_to(REPO)}:{n}: {line.strip()}")
    assert not bad, "in-place sort (use sort(false)):\n" + "\n".join(bad)
