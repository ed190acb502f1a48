"""GPU claiming, device errors and the out-of-memory back-off, all on CPU: a fake `nvidia-smi` on
PATH lists the devices, real processes claim them concurrently, and a forced OOM (the
UCE_NF_SIMULATE_GPU_TOKENS knob raises torch's CUDA OOM for batches above N tokens) drives the
back-off through the real embedding code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import PBMC, ROOT, run_uce

UUIDS = ["GPU-aaaa-0000", "GPU-bbbb-1111", "GPU-cccc-2222"]
CLAIM = """
import os, sys, time
from uce_nf.devices import claim_device
d = claim_device(lock_dir=sys.argv[1])
print(d.uuid if d else None, os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
"""


@pytest.fixture
def fake_smi(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    lines = "".join(f"GPU {i}: NVIDIA H200 (UUID: {u})\\n" for i, u in enumerate(UUIDS))
    (bindir / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '{lines}'\n")
    (bindir / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT / "src"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def claimers(env, locks, release, n, **extra):
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM, str(locks), str(release)], env={**env, **extra},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    return procs, [p.stdout.readline().split() for p in procs]


def test_concurrent_tasks_claim_distinct_devices_and_release_them(fake_smi, tmp_path):
    locks, release = tmp_path / "locks", tmp_path / "release"
    procs, got = claimers(fake_smi, locks, release, 3)
    assert sorted(g[0] for g in got) == UUIDS, got
    assert all(g[0] == g[1] for g in got), "each process sees only its own device"
    # a fourth task finds every device taken: one line, non-zero
    r = subprocess.run([sys.executable, "-c", CLAIM, str(locks), str(release)], env=fake_smi, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "all 3 GPUs of this node are claimed" in r.stderr
    # a killed task (SIGKILL: no clean-up code runs) frees its device
    victim = procs[1]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    p, again = claimers(fake_smi, locks, release, 1)
    assert again[0][0] == got[1][0]
    release.touch()
    for q in procs + p:
        q.wait(timeout=60)
    # all released: three new tasks get the three devices again
    release.unlink()
    procs, got = claimers(fake_smi, locks, release, 3)
    release.touch()
    for q in procs:
        q.wait(timeout=60)
    assert sorted(g[0] for g in got) == UUIDS


def test_narrowed_cuda_visible_devices_is_honoured(fake_smi, tmp_path):
    locks, release = tmp_path / "locks", tmp_path / "release"
    procs, got = claimers(fake_smi, locks, release, 2, CUDA_VISIBLE_DEVICES="2,0")
    release.touch()
    for q in procs:
        q.wait(timeout=60)
    assert sorted(g[0] for g in got) == sorted([UUIDS[2], UUIDS[0]])
    # one device given by the scheduler: used as given, no lock taken
    release.unlink()
    procs, got = claimers(fake_smi, tmp_path / "locks2", release, 2, CUDA_VISIBLE_DEVICES="1")
    release.touch()
    for q in procs:
        q.wait(timeout=60)
    assert [g[0] for g in got] == [UUIDS[1], UUIDS[1]]
    assert not (tmp_path / "locks2").exists()


def test_device_cuda_without_cuda_fails_in_one_line(model_dir, tmp_path):
    from uce_nf.devices import cuda_problem
    if cuda_problem() is None:
        pytest.skip("this machine has a usable GPU")
    from uce_nf.cli import main
    res = CliRunner().invoke(main, ["run", "--input", str(PBMC), "--model-dir", str(model_dir), "--device", "cuda",
                                    "--output", str(tmp_path / "o.h5ad")])
    assert res.exit_code == 2, res.output
    err = [line for line in res.output.splitlines() if line.startswith("ERROR")]
    assert len(err) == 1 and "--device cuda:" in err[0], res.output
    assert not (tmp_path / "o.h5ad").exists()


@pytest.fixture(scope="module")
def shard(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("shard")
    sf = d / "human.species.pt"
    run_uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--output", sf)
    run_uce("preprocess", "--input", PBMC, "--species-file", sf, "--output", d / "p.h5ad", "--stats", d / "s.json")
    run_uce("index", "--adata", d / "p.h5ad", "--species-file", sf, "--output", d / "i.npz")
    for compat in ("none", "reference"):
        run_uce("sentences", "--adata", d / "p.h5ad", "--index", d / "i.npz", "--output-dir", d / compat, "--name", "x",
                "--compat", compat, "--shard-size", 120)
    return d, sf


def _embed(shard, model_dir, compat, out, monkeypatch, simulate=None, extra=()):
    d, sf = shard
    if simulate:
        monkeypatch.setenv("UCE_NF_SIMULATE_GPU_TOKENS", str(simulate))
    else:
        monkeypatch.delenv("UCE_NF_SIMULATE_GPU_TOKENS", raising=False)
    from uce_nf.cli import main
    s = next((d / compat).glob("x.shard-00000.sentences.npz"))
    res = CliRunner().invoke(main, ["embed", "--sentences", str(s), "--species-file", str(sf), "--model-dir",
                                    str(model_dir), "--compat", compat, "--output", str(out), *map(str, extra)])
    return res


def test_oom_back_off_halves_batches_and_keeps_results(shard, model_dir, tmp_path, monkeypatch):
    """Forced OOM above 20 sentences' worth of tokens: batches are halved until they fit, and the
    embeddings equal the run without OOM (the default mode is batch-invariant)."""
    assert _embed(shard, model_dir, "none", tmp_path / "a.npz", monkeypatch).exit_code == 0
    res = _embed(shard, model_dir, "none", tmp_path / "b.npz", monkeypatch, simulate=20 * 1100)
    assert res.exit_code == 0, res.output
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert int(a["oom_splits"]) == 0 and int(b["oom_splits"]) >= 1
    np.testing.assert_array_equal(a["cell_index"], b["cell_index"])
    assert np.abs(a["embeddings"] - b["embeddings"]).max() <= 1e-5


def test_oom_in_compat_mode_names_the_largest_batch_that_fits(shard, model_dir, tmp_path, monkeypatch):
    d, _ = shard
    from uce_nf.sentences import load_sentences
    s = load_sentences(next((d / "reference").glob("x.shard-00000.sentences.npz")))
    length = int(np.diff(s["offsets"])[:25].max())
    res = _embed(shard, model_dir, "reference", tmp_path / "c.npz", monkeypatch, simulate=10 * length,
                 extra=["--batch-size", 25])
    assert res.exit_code == 2, res.output
    err = [line for line in res.output.splitlines() if line.startswith("ERROR")]
    assert len(err) == 1 and "--batch-size 25" in err[0], res.output
    fits = int(err[0].rsplit("--batch_size ", 1)[1])
    assert fits * length <= 10 * length and fits >= 5  # halving from 25: 12 is too big, 6 fits
    assert not (tmp_path / "c.npz").exists()


def test_default_batches_have_equal_lengths(shard, model_dir):
    import torch
    from uce_nf.embed import EmbedSettings, Embedder
    from uce_nf.sentences import load_sentences
    d, sf = shard
    emb = Embedder(torch.load(model_dir / "4layer_model.torch"), torch.load(sf, weights_only=False), EmbedSettings())
    s = load_sentences(next((d / "none").glob("x.shard-00000.sentences.npz")))
    lengths = np.diff(s["offsets"])
    batches = emb.batches(s)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert all(len(set(lengths[b].tolist())) == 1 for b in batches)
    assert all(emb._prepare(s, b)[1] is None for b in batches), "no padding, so no mask"


def test_report_names_the_gpu_of_each_run():
    from uce_nf.report_html import _device
    assert _device({"device": "cpu", "gpu_names": []}) == "cpu"
    assert _device({"device": "cuda", "gpu_names": ["NVIDIA H200"], "gpu_devices": ["GPU-aaaa-0000", "GPU-bbbb-1111"]}) \
        == "cuda: NVIDIA H200 (GPU-aaaa-0000, GPU-bbbb-1111)"
