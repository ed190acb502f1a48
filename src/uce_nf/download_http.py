"""Resumable, verified download of one file over HTTP(S), for ``uce download-model-files``
(download.py).

Behaviour and decisions
-----------------------
* Standard library only (``urllib``); a ``User-Agent`` header is sent, redirects (figshare ->
  object store) are followed and keep the ``Range`` header.
* Each file is written to ``<name>.part`` and renamed to ``<name>`` only after it is complete
  and verified, so an existing ``<name>`` is complete by construction and is skipped (unless a
  known ``size`` disagrees, in which case it is downloaded again). A
  ``<name>.part`` left by an interrupted run is resumed with ``Range: bytes=<size>-``: a
  ``206`` whose ``Content-Range`` starts at that offset is appended, a ``200`` (server ignores
  ranges) restarts from zero, a ``416`` means the part is already complete (or is discarded if
  its size disagrees with the reported total).
* Connection errors, timeouts, truncated bodies, HTTP 5xx, 408 and 429 are retried with
  exponential backoff (``backoff * 2**k`` seconds, capped at 60 s). The attempt counter
  resets whenever a try made progress, so a long download on a flaky link keeps going;
  ``--retries`` consecutive failures without progress end it. Other 4xx (404, 403 …) fail at
  once.
* Verification: the final size must equal the total announced by the server
  (``Content-Length`` of a 200, or the total of ``Content-Range``) and the known ``size``
  when given; ``sha256`` is checked when given (download.py passes ``KNOWN_FILES``). A file
  that fails verification is deleted.
* Progress: a one-line bar on stderr when stderr is a terminal; otherwise a log line at most
  every ``--log-interval`` seconds (default 30) and one at the end, for Nextflow logs.
* Errors are one line naming the file, the URL and what to do (``DownloadError``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from .io import UserError

__all__ = ["CHUNK", "DownloadError", "fetch"]

USER_AGENT = "uce-nf-downloader/1 (+https://github.com/snap-stanford/UCE model files)"
CHUNK = 1 << 20
MAX_BACKOFF = 60.0
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class DownloadError(UserError):
    """A download that cannot succeed without the user doing something (one-line message)."""


class _Retryable(Exception):
    """A transient failure: retry (with backoff)."""


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------
def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class _Progress:
    def __init__(self, name: str, done: int, total: int | None, *, stream=None,
                 tty: bool | None = None, interval: float = 30.0):
        self.name, self.done, self.total = name, done, total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.t0 = self.last = time.monotonic()
        self.start_done = done

    def _line(self) -> str:
        rate = (self.done - self.start_done) / max(time.monotonic() - self.t0, 1e-9)
        if self.total:
            pct = 100.0 * self.done / self.total
            return f"{self.name}: {_human(self.done)} / {_human(self.total)} ({pct:5.1f}%) {_human(rate)}/s"
        return f"{self.name}: {_human(self.done)} {_human(rate)}/s"

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty:
            if now - self.last >= 0.2:
                self.last = now
                bar = ""
                if self.total:
                    k = int(30 * self.done / self.total)
                    bar = "[" + "#" * k + "." * (30 - k) + "] "
                self.stream.write("\r" + bar + self._line() + "   ")
                self.stream.flush()
        elif now - self.last >= self.interval:
            self.last = now
            print("download " + self._line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self._line() + "   \n")
            self.stream.flush()
        else:
            print("download " + self._line() + " done", file=self.stream, flush=True)


# --------------------------------------------------------------------------------------------
# one file
# --------------------------------------------------------------------------------------------
def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 199, 1000); 'bytes */1000' -> (None, None, 1000)."""
    if not value or not value.strip().lower().startswith("bytes"):
        return None, None, None
    spec = value.strip()[5:].strip()
    rng, _, total = spec.partition("/")
    tot = int(total) if total.strip().isdigit() else None
    if rng.strip() == "*":
        return None, None, tot
    a, _, b = rng.partition("-")
    try:
        return int(a), int(b), tot
    except ValueError:
        return None, None, tot


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _attempt(url: str, part: Path, name: str, timeout: float, progress_kw: dict) -> int | None:
    """One HTTP request: append to ``part`` (resuming). Returns the announced total size (or
    None if unknown) once the body was read to its end. Raises _Retryable or DownloadError."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            _, _, total = _parse_content_range(e.headers.get("Content-Range"))
            e.close()
            if total is not None and total == have:
                return total  # the part file is already complete
            part.unlink()  # unusable part: start again
            raise _Retryable(f"HTTP 416 for a resumed request (part of {have} bytes discarded)")
        e.close()
        if e.code in RETRY_STATUS:
            raise _Retryable(f"HTTP {e.code} {e.reason}")
        raise DownloadError(
            f"{name}: HTTP {e.code} {e.reason} from {url} -- the URL is wrong or the file moved; "
            f"check --base-url/--url (official files: figshare article 24320806)") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _Retryable(f"{type(e).__name__}: {reason}")

    with resp:
        status = resp.status
        if status == 206:
            start, _, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != have:  # not the range we asked for: restart cleanly
                part.unlink(missing_ok=True)
                raise _Retryable(f"server answered range start {start}, expected {have}")
            mode = "ab"
        elif status == 200:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            have, mode = 0, "wb"  # whole file (server ignored Range or none was sent)
        else:
            raise _Retryable(f"unexpected HTTP status {status}")
        prog = _Progress(name, have, total, **progress_kw)
        try:
            with open(part, mode) as fh:
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise _Retryable(f"connection lost after {_human(prog.done)}: {type(e).__name__}: {e}")
                    if not chunk:
                        break
                    fh.write(chunk)
                    prog.update(len(chunk))
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            if prog.tty:  # end the progress line before the retry message
                prog.stream.write("\n")
            raise
        got = part.stat().st_size
        if total is not None and got < total:
            raise _Retryable(f"connection closed after {got} of {total} bytes")
        if total is not None and got > total:
            part.unlink()
            raise _Retryable(f"received {got} bytes, more than the announced {total}")
        prog.close()
        return total


def fetch(url: str, path, *, size: int | None = None, sha256: str | None = None,
          retries: int = 8, backoff: float = 2.0, timeout: float = 60.0,
          log: Callable[[str], None] | None = None, progress_kw: dict | None = None,
          sleep: Callable[[float], None] = time.sleep) -> Path:
    """Download ``url`` to ``path`` (resuming ``path.part``), verify, rename atomically.

    An existing ``path`` is returned untouched unless ``size`` is given and differs."""
    path = Path(path)
    name = path.name
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    progress_kw = progress_kw or {}
    if path.exists():
        if size is None or path.stat().st_size == size:
            log(f"{name}: already present, skipped")
            return path
        log(f"{name}: size {path.stat().st_size} != known {size}; downloading again")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(name + ".part")
    if part.exists():
        log(f"{name}: resuming from {_human(part.stat().st_size)}")
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            total = _attempt(url, part, name, timeout, progress_kw)
            break
        except _Retryable as e:
            after = part.stat().st_size if part.exists() else 0
            failures = 0 if after > before else failures + 1
            if failures > retries:
                resume = f": it resumes from {part.name}" if part.exists() else ""
                raise DownloadError(
                    f"{name}: giving up after {retries} retries without progress ({e}) from {url} -- "
                    f"check the network/proxy (or --base-url) and rerun{resume}") from None
            wait = min(MAX_BACKOFF, backoff * 2 ** max(failures - 1, 0))
            log(f"{name}: {e}; retrying in {wait:.1f} s")
            sleep(wait)
    got = part.stat().st_size
    for expected, what in ((total, "announced by the server"), (size, "known")):
        if expected is not None and got != expected:
            part.unlink()
            raise DownloadError(f"{name}: got {got} bytes but {expected} {what} from {url} -- "
                                f"the partial file was deleted; rerun (or check the mirror)")
    if sha256:
        digest = _sha256_file(part)
        if digest.lower() != sha256.lower():
            part.unlink()
            raise DownloadError(f"{name}: sha256 {digest} does not match the expected {sha256} "
                                f"(from {url}) -- the file was deleted; rerun, or check the mirror "
                                f"(--base-url/--url) serves the official file")
    os.replace(part, path)
    return path
