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
* Each file is fetched by ``download_http.fetch`` (standard library only): resumed from
  ``<name>.part``, retried with backoff, verified (size, and sha256 when ``KNOWN_FILES`` has
  one), then renamed into place; an existing ``<name>`` is skipped. No upstream checksums or
  sizes are published, so ``KNOWN_FILES`` is empty: values are added only when measured on
  the real files, never guessed.
* ``protein_embeddings.tar.gz`` is unpacked into ``protein_embeddings/`` via a temporary
  folder that is renamed into place (atomic; an existing ``protein_embeddings/`` counts as
  done). Members must be regular files or folders with relative paths that stay inside the
  target (no ``..``, absolute paths, links or devices); a single top-level
  ``protein_embeddings/`` folder in the archive is stripped. The archive is deleted after a
  successful unpack unless ``--keep-archive``.
* Errors are one line naming the file, the URL and what to do (exit status 2).
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import click

from .download_http import CHUNK, DownloadError, fetch
from .io import handle_errors

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
@handle_errors
def download_model_files_command(dest, model, base_url, urls, keep_archive, retries, backoff, timeout,
                                 log_interval):
    """Download the official UCE model files (figshare) into DEST, resuming partial downloads."""
    files = download_model_files(dest, model=model, base_url=base_url, urls=urls, keep_archive=keep_archive,
                                 retries=retries, backoff=backoff, timeout=timeout, log_interval=log_interval)
    click.echo(f"model files ready in {dest} ({', '.join(sorted(files))})", err=True)
