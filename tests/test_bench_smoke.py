"""Smoke checks of the benchmark harness (bench/), fast (< 30 s): its measurement of a subprocess,
the synthetic data generator, the padding arithmetic and the markdown report. The benchmark itself
is a script (docs/benchmarks.md), never a timed test; `bench/run_bench.py --quick` runs every
section end to end at tiny sizes (minutes, so not here)."""

from __future__ import annotations

import json
import sys

import numpy as np
import scipy.sparse as sp

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_measure_reports_time_cpu_and_peak_rss(tmp_path):
    import run_bench
    # Busy for 0.3 s of CPU time (not wall time): on a loaded machine a wall-clock loop gets < 0.1 s of CPU.
    code = "import json, time; b = bytearray(200 * 2**20); t = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n" \
           "print('RESULT ' + json.dumps({'cells': 3}))"
    r = run_bench.measure([[sys.executable, "-c", code]], tmp_path / "m")[0]
    assert r["cells"] == 3
    assert r["wall_s"] >= 0.3 and r["cpu_s"] > 0.1
    # no upper bound: wait4's ru_maxrss carries the forking parent's RSS across fork+exec (pytest's,
    # ~1 GB after the atlas tests), so only the floor is the child's own
    assert r["peak_rss_mb"] >= 200 and r["peak_tree_rss_mb"] >= 200
    assert "load_before" in r


def test_synthetic_rows_keep_real_counts_and_width():
    from make_data import synth_chunk
    rng = np.random.default_rng(0)
    src = sp.random(50, 30, density=0.3, format="csr", random_state=1, data_rvs=lambda n: rng.integers(1, 9, n)).astype(np.float32)
    m = synth_chunk(src, 40, 100, 0.5, np.random.default_rng(2))
    assert m.shape == (40, 100) and m.has_sorted_indices
    assert set(np.unique(m.data)) <= set(np.unique(src.data))  # values are real counts of the source
    assert 0.05 < m.nnz / (40 * 100) < 0.3  # ~ density 0.3 x keep 0.5


def test_padding_fraction_and_report():
    import run_bench
    lengths = np.array([10, 20, 10, 20])
    assert run_bench.padding_fraction(lengths, [np.array([0, 1]), np.array([2, 3])]) == 1 - 60 / 80
    assert run_bench.padding_fraction(lengths, [np.array([0, 2]), np.array([1, 3])]) == 0.0
    results = ROOT / "bench" / "latest.json"
    if results.exists():  # the committed latest run renders
        md = run_bench.markdown(json.loads(results.read_text()))
        assert md.count("\n") > 5 and "sentences cells/s" in md


def test_subset_repeats_cells_in_order_beyond_the_shard():
    import tasks
    s = {"tokens": np.arange(10, dtype=np.uint32), "offsets": np.array([0, 3, 7, 10]), "cell_index": np.arange(3)}
    first = tasks._subset(s, 2)
    assert first["tokens"].tolist() == list(range(7)) and first["offsets"].tolist() == [0, 3, 7]
    more = tasks._subset(s, 5)  # cells 0 1 2 0 1
    assert more["offsets"].tolist() == [0, 3, 7, 10, 13, 17]
    assert more["tokens"].tolist() == list(range(10)) + list(range(7))
