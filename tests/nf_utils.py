"""Helpers for the Nextflow tests: find/install Nextflow, run it offline, read its trace."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("UCE_NF_CACHE", Path.home() / ".cache" / "uce-nf"))
DEMO = REPO / "assets" / "demo"
MODEL_DIR = DEMO / "model_files"
PBMC = DEMO / "pbmc_demo.h5ad"
MOUSE = DEMO / "mouse_demo.h5ad"
VENV_BIN = Path(sys.executable).parent

HAVE_ENGINE = importlib.util.find_spec("uce_nf") is not None
requires_engine = pytest.mark.skipif(
    not HAVE_ENGINE, reason="uce_nf (the engine behind bin/uce-*) is not importable in this Python")

# Short JVM start-up for the many short runs (C1 JIT only, serial GC): ~2x faster launches.
FAST_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"

_nextflow: str | None = None


def nextflow_bin() -> str:
    """Our launcher, else `nextflow` on PATH, else install it with scripts/install_nextflow.sh."""
    global _nextflow
    if _nextflow:
        return _nextflow
    launcher = CACHE / "bin" / "nextflow"
    cand = str(launcher) if launcher.exists() else shutil.which("nextflow")
    if not cand:
        r = subprocess.run(["bash", str(REPO / "scripts" / "install_nextflow.sh")],
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.skip(f"Nextflow unavailable and scripts/install_nextflow.sh failed: {r.stderr[-500:]}")
        cand = r.stdout.strip().splitlines()[-1]
    _nextflow = cand
    return cand


def nf_env(**extra: str) -> dict:
    env = dict(os.environ)
    # Tasks run bin/uce-* with `#!/usr/bin/env python3`: the venv's Python must come first.
    env["PATH"] = os.pathsep.join([str(VENV_BIN), str(CACHE / "bin"), env.get("PATH", "")])
    env["NXF_OFFLINE"] = "true"
    env["NXF_ANSI_LOG"] = "false"
    env.setdefault("NXF_OPTS", FAST_JVM)
    env.pop("NXF_WORK", None)
    env.update(extra)
    return env


def run_nf(args: list[str], cwd: Path, timeout: int = 1200, **env) -> subprocess.CompletedProcess:
    """`nextflow <args>` in cwd (its own .nextflow cache and log); stdout and stderr merged."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([nextflow_bin(), *args], cwd=cwd, env=nf_env(**env), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def run_pipeline(launch: Path, *args: str, profile: str = "test", timeout: int = 1500) -> subprocess.CompletedProcess:
    """`nextflow run <repo> -profile <profile> -ansi-log false -w <launch>/work <args>`."""
    return run_nf(["run", str(REPO), "-profile", profile, "-ansi-log", "false",
                   "-w", str(launch / "work"), *args], cwd=launch, timeout=timeout)


def assert_ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"nextflow exited {r.returncode}:\n{r.stdout[-6000:]}"


def read_trace(outdir: Path, suffix: str) -> list[dict]:
    path = outdir / "pipeline_info" / f"execution_trace_{suffix}.txt"
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def simple_name(row: dict) -> str:
    return row["process"].split(":")[-1]


def fake_model_dir(root: Path) -> Path:
    """Empty model files in the official layout under root/models: enough for -stub-run."""
    models = root / "models"
    (models / "protein_embeddings").mkdir(parents=True, exist_ok=True)
    for name in ("4layer_model.torch", "species_chrom.csv", "species_offsets.pkl", "all_tokens.torch"):
        (models / name).touch()
    return models


def make_fake_inputs(root: Path) -> tuple[Path, Path]:
    """Empty stand-ins for datasets and model files: enough for -stub-run and input checks.
    Returns (samplesheet with 3 datasets of 2 species, model_dir)."""
    models = fake_model_dir(root)
    data = root / "data"
    data.mkdir(exist_ok=True)
    (data / "a.h5ad").touch()
    (data / "b.h5ad").touch()
    sheet = root / "samplesheet.csv"
    sheet.write_text("sample,h5ad,species\nhuman_a,data/a.h5ad,human\nhuman_b,data/a.h5ad,human\n"
                     f"mouse_c,{data / 'b.h5ad'},mouse\n")
    return sheet, models


def ensure_demo() -> None:
    """assets/demo/ (pbmc + mouse demo h5ad, synthetic model files) for the test profile."""
    if (MODEL_DIR / "4layer_model.torch").exists() and PBMC.exists() and MOUSE.exists():
        return
    r = subprocess.run([sys.executable, "-m", "uce_nf.cli", "make-demo", "--dest", str(DEMO)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"uce make-demo failed:\n{r.stderr[-3000:]}"


FAKE_SBATCH = """#!/bin/bash
# Stand-in for sbatch: keeps the #SBATCH lines, runs the job script in the background.
grep '^#SBATCH' .command.run > .sbatch_args
nohup bash .command.run >/dev/null 2>&1 &
echo "Submitted batch job $!"
"""


def fake_slurm(root: Path) -> str:
    """sbatch/squeue stand-ins that run each job locally; returns the PATH to launch Nextflow with."""
    fake = root / "fakebin"
    fake.mkdir(exist_ok=True)
    (fake / "sbatch").write_text(FAKE_SBATCH)
    (fake / "squeue").write_text("#!/bin/bash\nexit 0\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    return f"{fake}{os.pathsep}{os.environ['PATH']}"
