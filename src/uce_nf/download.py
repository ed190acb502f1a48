"""Download the official UCE model files (uce-reference.md §3.1) into a ``model_files/`` folder.

``uce download-model-files --dest DIR [--model 4layer|33layer] [--base-url URL] [--url NAME=URL]``

Files (figshare article 24320806; the weights' licence is unconfirmed, so they are fetched
at run time and never redistributed):

==============================  ===============================================
``species_chrom.csv``           https://figshare.com/ndownloader/files/42706558
``species_offsets.pkl``         https://figshare.com/ndownloader/files/42706555
``protein_embeddings.tar.gz``   https://figshare.com/ndownloader/files/42715213
``all_tokens.torch``            https://figshare.com/ndownloader/files/42706585
``4layer_model.torch``          https://figshare.com/ndownloader/files/42706576   (``--model 4layer``)
``33l_8ep_1024t_1280.torch``    https://figshare.com/ndownloader/files/43423236   (``--model 33layer``)
==============================  ===============================================

Behaviour and decisions
-----------------------
* Standard library only (``urllib``); a ``User-Agent`` header is sent, redirects (figshare ->
  object store) are followed and keep the ``Range`` header.
* Each file is written to ``<name>.part`` and renamed to ``<name>`` only after it is complete
  and verified, so an existing ``<name>`` is complete by construction and is skipped (unless a
  known size in ``KNOWN_FILES`` disagrees, in which case it is downloaded again). A
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
  (``Content-Length`` of a 200, or the total of ``Content-Range``) and the known size when
  ``KNOWN_FILES`` has one; the sha256 is checked when known. No upstream checksums or
  sizes are published, so the table is empty: values are added only when measured on the
  real files, never guessed. A file that fails verification is deleted.
* ``protein_embeddings.tar.gz`` is unpacked into ``protein_embeddings/`` via a temporary
  folder that is renamed into place (atomic; an existing ``protein_embeddings/`` counts as
  done). Members must be regular files or folders with relative paths that stay inside the
  target (no ``..``, absolute paths, links or devices); a single top-level
  ``protein_embeddings/`` folder in the archive is stripped. The archive is deleted after a
  successful unpack unless ``--keep-archive``.
* Progress: a one-line bar on stderr when stderr is a terminal; otherwise a log line at most
  every ``--log-interval`` seconds (default 30) and one at the end, for Nextflow logs.
* Errors are one line naming the file, the URL and what to do (exit status 2).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import click

from .io import UserError

__all__ = [
    "FIGSHARE",
    "SHARED_FILES",
    "CHECKPOINTS",
    "KNOWN_FILES",
    "DownloadError",
    "fetch",
    "safe_extract_tar",
    "model_file_urls",
    "download_model_files",
    "download_model_files_command",
]

FIGSHARE = "https://figshare.com/ndownloader/files/"
SHARED_FILES = {
    "species_chrom.csv": FIGSHARE + "42706558",
    "species_offsets.pkl": FIGSHARE + "42706555",
    "protein_embeddings.tar.gz": FIGSHARE + "42715213",
    "all_tokens.torch": FIGSHARE + "42706585",
}
CHECKPOINTS = {
    "4layer": ("4layer_model.torch", FIGSHARE + "42706576"),
    "33layer": ("33l_8ep_1024t_1280.torch", FIGSHARE + "43423236"),
}
ARCHIVE = "protein_embeddings.tar.gz"
ARCHIVE_DIR = "protein_embeddings"


@dataclass(frozen=True)
class Known:
    size: int | None = None
    sha256: str | None = None


#: Known sizes / sha256 of the official files. Nothing is published upstream, so all entries
#: are empty; fill them only from measurements of the real files.
KNOWN_FILES: dict[str, Known] = {
    "species_chrom.csv": Known(),
    "species_offsets.pkl": Known(),
    "protein_embeddings.tar.gz": Known(),
    "all_tokens.torch": Known(),
    "4layer_model.torch": Known(),
    "33l_8ep_1024t_1280.torch": Known(),
}

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


# --------------------------------------------------------------------------------------------
# archive
# --------------------------------------------------------------------------------------------
def _member_target(name: str, strip: str | None) -> PurePosixPath | None:
    p = PurePosixPath(name)
    if p.is_absolute() or "\\" in name or any(part == ".." for part in p.parts):
        raise DownloadError(f"unsafe path {name!r} in the archive -- refusing to unpack it; "
                            f"delete it and download the official file again")
    parts = [x for x in p.parts if x not in ("", ".")]
    if strip and parts and parts[0] == strip:
        parts = parts[1:]
    return PurePosixPath(*parts) if parts else None


def safe_extract_tar(archive, target) -> Path:
    """Unpack a (gzipped) tar into ``target`` atomically, refusing unsafe members. A single
    top-level ``protein_embeddings/`` folder in the archive is stripped."""
    archive, target = Path(archive), Path(target)
    if target.exists():
        raise DownloadError(f"{target} already exists; remove it to unpack {archive.name} again")
    tmp = target.with_name(f".{target.name}.unpacking-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir()):
                    raise DownloadError(f"{archive.name}: member {m.name!r} is a link or special file "
                                        f"-- refusing to unpack; download the official file again")
                _member_target(m.name, None)  # path check before anything is written
            tops = set()
            for m in members:
                parts = [x for x in PurePosixPath(m.name).parts if x not in ("", ".")]
                if parts:
                    tops.add(parts[0] if (len(parts) > 1 or m.isdir()) else "")
            strip = ARCHIVE_DIR if tops == {ARCHIVE_DIR} else None
            tmp.mkdir(parents=True)
            root = tmp.resolve()
            for m in members:
                rel = _member_target(m.name, strip)
                if rel is None:
                    continue
                out = (tmp / rel)
                if root not in out.resolve().parents and out.resolve() != root:
                    raise DownloadError(f"unsafe path {m.name!r} in {archive.name} -- refusing to unpack")
                if m.isdir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                with src, open(out, "wb") as fh:
                    shutil.copyfileobj(src, fh, CHUNK)
    except tarfile.TarError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{archive.name}: not a readable tar.gz ({e}) -- delete it and rerun") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------------------------
# the set of model files
# --------------------------------------------------------------------------------------------
def model_file_urls(model: str = "4layer", base_url: str | None = None,
                    urls: dict[str, str] | None = None) -> dict[str, str]:
    """File name -> URL. ``base_url`` replaces the official host (``<base_url>/<file name>``);
    ``urls`` overrides single files."""
    if model not in CHECKPOINTS:
        raise DownloadError(f"unknown --model {model!r}; choose one of {', '.join(CHECKPOINTS)}")
    files = dict(SHARED_FILES)
    ckpt, ckpt_url = CHECKPOINTS[model]
    files[ckpt] = ckpt_url
    if base_url:
        files = {name: base_url.rstrip("/") + "/" + name for name in files}
    for name, url in (urls or {}).items():
        if name not in files:
            raise DownloadError(f"--url {name}=...: unknown file; known: {', '.join(files)}")
        files[name] = url
    return files


def download_model_files(dest, *, model: str = "4layer", base_url: str | None = None,
                         urls: dict[str, str] | None = None, known: dict[str, Known] | None = None,
                         keep_archive: bool = False, retries: int = 8, backoff: float = 2.0,
                         timeout: float = 60.0, log_interval: float = 30.0,
                         log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Download (or complete) the official model files for ``model`` into ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    known = KNOWN_FILES if known is None else known
    out: dict[str, Path] = {}
    for name, url in model_file_urls(model, base_url, urls).items():
        k = known.get(name, Known())
        if name == ARCHIVE:
            target = dest / ARCHIVE_DIR
            if target.is_dir():
                log(f"{ARCHIVE_DIR}/: already present, skipped")
                out[ARCHIVE_DIR] = target
                continue
        log(f"{name}: {url}")
        path = fetch(url, dest / name, size=k.size, sha256=k.sha256, retries=retries, backoff=backoff,
                     timeout=timeout, log=log, progress_kw={"interval": log_interval})
        if name == ARCHIVE:
            log(f"{name}: unpacking into {ARCHIVE_DIR}/")
            out[ARCHIVE_DIR] = safe_extract_tar(path, dest / ARCHIVE_DIR)
            if not keep_archive:
                path.unlink()
        else:
            out[name] = path
    return out


def _parse_url_override(ctx, param, values):
    out = {}
    for v in values:
        name, sep, url = v.partition("=")
        if not sep or not name or not url:
            raise click.BadParameter(f"expected NAME=URL, got {v!r}")
        out[name] = url
    return out


@click.command("download-model-files")
@click.option("--dest", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The model_files folder to fill (created if missing).")
@click.option("--model", type=click.Choice(sorted(CHECKPOINTS)), default="4layer", show_default=True,
              help="Which checkpoint to fetch besides the shared files.")
@click.option("--base-url", default=None, metavar="URL",
              help="Mirror: fetch every file as URL/<file name> instead of from figshare.")
@click.option("--url", "urls", multiple=True, callback=_parse_url_override, metavar="NAME=URL",
              help="Override the URL of one file (repeatable), e.g. all_tokens.torch=https://...")
@click.option("--keep-archive", is_flag=True, help="Keep protein_embeddings.tar.gz after unpacking.")
@click.option("--retries", default=8, show_default=True, type=click.IntRange(min=0),
              help="Consecutive failed tries (without progress) before giving up.")
@click.option("--backoff", default=2.0, show_default=True, type=click.FloatRange(min=0),
              help="First retry delay in seconds (doubles each time, max 60).")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Socket timeout in seconds.")
@click.option("--log-interval", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between progress log lines when stderr is not a terminal.")
def download_model_files_command(dest, model, base_url, urls, keep_archive, retries, backoff, timeout,
                                 log_interval):
    """Download the official UCE model files (figshare) into DEST, resuming partial downloads."""
    try:
        files = download_model_files(dest, model=model, base_url=base_url, urls=urls,
                                     keep_archive=keep_archive, retries=retries, backoff=backoff,
                                     timeout=timeout, log_interval=log_interval)
    except UserError as e:
        click.echo(f"ERROR: {e}", err=True)
        sys.exit(2)
    click.echo(f"model files ready in {dest} ({', '.join(sorted(files))})", err=True)
