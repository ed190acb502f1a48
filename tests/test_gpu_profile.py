"""The gpu profile on SLURM and the other executors (issue 11): the GPU request reaches sbatch for
EMBED and for nothing else, EMBED runs with --device cuda, and containers see the GPUs and the
node's GPU lock folder. SLURM is a stand-in sbatch/squeue that runs each job locally (-stub-run)."""

from __future__ import annotations

import re

import pytest

from nf_utils import REPO, assert_ok, fake_slurm, make_fake_inputs, read_trace, run_nf, simple_name

pytestmark = pytest.mark.nextflow


def config_text(tmp_path, profile: str) -> str:
    r = run_nf(["config", str(REPO), "-profile", profile], cwd=tmp_path, timeout=300)
    assert_ok(r)
    return r.stdout


def test_nextflow_config_shows_the_gpu_request_on_embed_only(tmp_path):
    text = config_text(tmp_path, "slurm,gpu")
    blocks = re.findall(r"(withLabel:\S+|withName:\S+) \{(.*?)\n   \}", text, re.S)
    with_gres = [name for name, body in blocks if "--gres=gpu:1" in body]
    assert with_gres == ["withLabel:process_gpu"], with_gres
    assert re.search(r"^   clusterOptions = null$", text, re.M), "no GPU request at the process level"
    assert "device = 'cuda'" in text
    assert "--gres" not in config_text(tmp_path, "slurm").split("params {")[1].split("}", 1)[1]


def test_slurm_gpu_stub_run_requests_a_gpu_for_embed_only(tmp_path):
    sheet, models = make_fake_inputs(tmp_path)
    path = fake_slurm(tmp_path)
    fast = tmp_path / "fast.config"
    fast.write_text("executor {\n    submitRateLimit = '100/1s'\n    pollInterval = '200ms'\n    queueStatInterval = '1s'\n}\n")
    out = tmp_path / "out"
    r = run_nf(["run", str(REPO), "-profile", "slurm,gpu", "-c", str(fast), "-ansi-log", "false", "-stub-run",
                "-w", str(tmp_path / "work"), "--input", str(sheet), "--model_dir", str(models), "--outdir", str(out),
                "--slurm_cluster_options=--account=lab", "--trace_report_suffix", "s"],
               cwd=tmp_path, timeout=900, PATH=path)
    assert_ok(r)
    names = {row["hash"]: simple_name(row) for row in read_trace(out, "s")}
    seen = {}
    for args in (tmp_path / "work").glob("*/*/.sbatch_args"):
        h = f"{args.parent.parent.name}/{args.parent.name[:6]}"
        seen[names[h]] = args.read_text()
    assert "EMBED" in seen and len(seen) >= 5, sorted(seen)
    for name, text in seen.items():
        assert ("--gres=gpu:1" in text) == (name == "EMBED"), (name, text)
        assert "--account=lab" in text, (name, text)
