"""How the benchmark measures a piece: run commands as subprocesses, concurrently, and record per
command wall seconds, CPU seconds (os.wait4), peak RSS (ru_maxrss) and the peak RSS/PSS summed over
its process tree (sampled every 0.1 s), plus the load average before and after."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path


def _tree_mem(pid: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) over the process and its descendants. RSS counts pages shared by
    forked workers once per process (an upper bound); PSS splits them (the real total)."""
    import psutil
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    rss = pss = 0
    for q in procs:
        try:
            m = q.memory_full_info()
            rss += m.rss
            pss += getattr(m, "pss", m.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, pss


def measure(cmds: list[list[str]], log: Path, env: dict | None = None) -> list[dict]:
    """Run the commands concurrently; wait for all. Per command: wall, cpu, peak RSS (own, tree)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    procs = []
    for i, cmd in enumerate(cmds):
        fh = open(f"{log}.{i}.log" if len(cmds) > 1 else f"{log}.log", "w")
        procs.append({"p": subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}),
                      "fh": fh, "peak_tree": 0, "peak_pss": 0, "cmd": cmd})
    pending = {q["p"].pid: q for q in procs}
    while pending:
        for pid, q in list(pending.items()):
            rss, pss = _tree_mem(pid)
            q["peak_tree"], q["peak_pss"] = max(q["peak_tree"], rss), max(q["peak_pss"], pss)
            wpid, status, ru = os.wait4(pid, os.WNOHANG)
            if wpid:
                q.update(wall=time.perf_counter() - t0, rc=os.waitstatus_to_exitcode(status),
                         cpu=ru.ru_utime + ru.ru_stime, maxrss=ru.ru_maxrss * 1024)
                q["p"].returncode = q["rc"]
                q["fh"].close()
                del pending[pid]
        time.sleep(0.1)
    out = []
    for i, q in enumerate(procs):
        text = Path(q["fh"].name).read_text()
        if q["rc"] != 0:
            raise RuntimeError(f"{' '.join(map(str, q['cmd']))} failed (rc {q['rc']}):\n{text[-3000:]}")
        res = {}
        for line in text.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[7:])
        res.update(wall_s=round(q["wall"], 3), cpu_s=round(q["cpu"], 3), peak_rss_mb=round(q["maxrss"] / 2**20, 1),
                   peak_tree_rss_mb=round(max(q["peak_tree"], q["maxrss"]) / 2**20, 1),
                   peak_tree_pss_mb=round(q["peak_pss"] / 2**20, 1),
                   load_before=round(load0, 2), load_after=round(os.getloadavg()[0], 2))
        out.append(res)
    return out
