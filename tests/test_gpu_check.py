"""bench/gpu_check.sh, the device check for a lent GPU machine, runs end to end on CPU (--cpu-smoke):
the reference model class from the wheel or the installed package, our compat and default modes, the
forced OOM back-off. Its numbers are meaningless on CPU; its parity and back-off checks are not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_cpu_smoke(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["machine"]["smoke"] and set(res["models"]) == {"1-layer", "2-layer"}
    for m in res["models"].values():
        assert m["compat_vs_reference_min_cosine"] >= 0.99999
        assert m["reference_fp32_cells_per_s"] > 0 and m["default_bf16_cells_per_s"] > 0
    assert res["oom_back_off"]["oom_splits"] >= 1 and res["oom_back_off"]["max_abs_diff_vs_no_oom"] <= 1e-5
    assert "| 2-layer |" in (tmp_path / "gpu_check.md").read_text()
