"""Nextflow trace files for `uce report`: per-process realtime and peak memory, matched to samples."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from .io import UserError


_DUR = re.compile(r"([\d.]+)\s*(ms|s|m|h|d)\b")
_MEM = re.compile(r"([\d.]+)\s*([KMGTP]?B)\b", re.IGNORECASE)


def parse_duration(text: str) -> float | None:
    """Nextflow durations ('1h 2m 3s', '4.5s', '120ms', raw milliseconds) -> seconds."""
    t = (text or "").strip()
    if not t or t == "-":
        return None
    if re.fullmatch(r"\d+", t):
        return int(t) / 1000
    parts = _DUR.findall(t)
    if not parts:
        return None
    return sum(float(v) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}[u] for v, u in parts)


def parse_memory(text: str) -> float | None:
    t = (text or "").strip()
    if not t or t == "-":
        return None
    if re.fullmatch(r"\d+", t):
        return float(t)
    m = _MEM.search(t)
    if not m:
        return None
    return float(m.group(1)) * 1024 ** "BKMGTP".index(m.group(2).upper()[0])


def read_trace(path: Path) -> list[dict]:
    """Successful tasks of a Nextflow trace file: process (last name component), tag, seconds, rss."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if rows and "name" not in rows[0] and "process" not in rows[0]:
        raise UserError(f"{path}: not a Nextflow trace file (tab-separated, with a 'name' or 'process' column)")
    tasks = []
    for r in rows:
        if r.get("status", "COMPLETED") not in ("COMPLETED", "CACHED", ""):
            continue
        name = r.get("name", "") or ""
        m = re.match(r"^(.*?)\s*\((.*)\)\s*$", name)
        process = r.get("process") or (m.group(1) if m else name)
        tag = r.get("tag") or (m.group(2) if m else "")
        secs = parse_duration(r.get("realtime", "")) if r.get("realtime") else None
        if secs is None:
            secs = parse_duration(r.get("duration", ""))
        tasks.append({"process": process.split(":")[-1], "tag": "" if tag == "-" else tag, "seconds": secs,
                      "peak_rss": parse_memory(r.get("peak_rss", ""))})
    return tasks


def summarise_tasks(tasks: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for t in tasks:
        p = out.setdefault(t["process"], {"tasks": 0, "realtime_s": 0.0, "peak_rss_bytes": None})
        p["tasks"] += 1
        p["realtime_s"] += t["seconds"] or 0.0
        if t["peak_rss"] is not None:
            p["peak_rss_bytes"] = max(p["peak_rss_bytes"] or 0, t["peak_rss"])
    for p in out.values():
        p["realtime_s"] = round(p["realtime_s"], 3)
    return out


def tasks_of(sample: str, tasks: list[dict]) -> list[dict]:
    shard = re.compile(re.escape(sample) + r"\.shard-\d+$")
    return [t for t in tasks if t["tag"] == sample or shard.match(t["tag"])]
