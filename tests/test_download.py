"""`uce download-model-files` against a real HTTP server on 127.0.0.1 (random port, own thread)
that honours Range requests and can drop connections, fail with 5xx, or ignore ranges."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from uce_nf import download as dl
from uce_nf.download import DownloadError, Known, download_model_files_command, fetch, safe_extract_tar
from uce_nf.download_http import _Progress

PE_NAMES = [
    "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt",
    "Mus_musculus.GRCm39.gene_symbol_to_embedding_ESM2.pt",
    "Danio_rerio.GRCz11.gene_symbol_to_embedding_ESM2.pt",
]


def _tar_gz(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        dirs = sorted({str(Path(n).parent) for n in entries if str(Path(n).parent) not in (".", "..")})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


class FileServer:
    """Serves `files` (url path -> bytes). Knobs: `drop_once` paths are cut after half the body
    on their first request; `fail` maps a path to statuses returned first; `ignore_range`."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_once: set[str] = set()
        self.fail: dict[str, list[int]] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_GET(self):
                path = self.path
                rng = self.headers.get("Range")
                server.requests.append((path, rng))
                if server.fail.get(path):
                    self.send_error(server.fail[path].pop(0))
                    return
                if path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[path]
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
                if m and not server.ignore_range:
                    start = int(m.group(1))
                    end = int(m.group(2)) if m.group(2) else len(data) - 1
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    body = data[start:end + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if path in server.drop_once:
                    server.drop_once.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return  # the server closes the socket: the client sees a truncated body
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gets(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


@pytest.fixture
def server():
    s = FileServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _quiet(msg):  # log sink
    pass


def _model_files(seed: int = 0) -> dict[str, bytes]:
    rnd = lambda n, k: hashlib.sha256(f"{seed}-{k}".encode()).digest() * (n // 32 + 1)  # noqa: E731
    pe = {f"protein_embeddings/{n}": rnd(3000 + 100 * i, n)[: 3000 + 100 * i] for i, n in enumerate(PE_NAMES)}
    return {
        "species_chrom.csv": b"species,gene_symbol,chromosome,start\nhuman,A1BG,19,58345178\n",
        "species_offsets.pkl": rnd(100, "pkl")[:100],
        "all_tokens.torch": rnd(200_000, "tok")[:200_000],
        "4layer_model.torch": rnd(300_000, "ckpt")[:300_000],
        "protein_embeddings.tar.gz": _tar_gz(pe),
        "_pe": pe,
    }


def test_cli_downloads_unpacks_and_skips_complete_files(server, tmp_path):
    files = _model_files()
    pe = files.pop("_pe")
    for name, data in files.items():
        server.files[f"/mirror/{name}"] = data
    dest = tmp_path / "model_files"
    args = ["--dest", str(dest), "--base-url", server.base + "/mirror/", "--backoff", "0"]
    res = CliRunner().invoke(download_model_files_command, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for name, data in files.items():
        if name != "protein_embeddings.tar.gz":
            assert (dest / name).read_bytes() == data
    for name, data in pe.items():  # the archive's top folder is the target folder itself
        assert (dest / name).read_bytes() == data
    assert sorted(p.name for p in (dest / "protein_embeddings").iterdir()) == sorted(PE_NAMES)
    assert not (dest / "protein_embeddings.tar.gz").exists()  # removed after unpacking
    assert not list(dest.glob("*.part")) and not list(dest.glob(".*"))
    assert "done" in res.output  # non-TTY: log lines, no progress bar

    n = len(server.requests)
    res = CliRunner().invoke(download_model_files_command, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert len(server.requests) == n, "complete files must not be fetched again"
    assert "already present, skipped" in res.output


def test_resume_after_connection_dropped_halfway(server, tmp_path):
    data = os.urandom(300_001)
    server.files["/big.bin"] = data
    server.drop_once.add("/big.bin")
    sleeps = []
    out = fetch(server.base + "/big.bin", tmp_path / "big.bin", backoff=0.5, log=_quiet, sleep=sleeps.append)
    assert out.read_bytes() == data
    assert server.gets("/big.bin") == [None, f"bytes={300_001 // 2}-"]  # second request resumed
    assert sleeps == [0.5]  # one retry after the drop (progress was made: counter reset)
    assert not (tmp_path / "big.bin.part").exists()


def test_resume_existing_part_and_server_ignoring_range(server, tmp_path):
    data = os.urandom(50_000)
    server.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data[:12_345])
    fetch(server.base + "/f.bin", tmp_path / "f.bin", log=_quiet)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert server.gets("/f.bin") == ["bytes=12345-"]

    # a server that ignores Range answers 200: the part is rewritten from zero, not appended to
    server.ignore_range = True
    (tmp_path / "g.bin.part").write_bytes(b"garbage")
    server.files["/g.bin"] = data
    fetch(server.base + "/g.bin", tmp_path / "g.bin", log=_quiet)
    assert (tmp_path / "g.bin").read_bytes() == data


def test_complete_part_gets_416_and_is_finalised(server, tmp_path):
    data = os.urandom(1000)
    server.files["/c.bin"] = data
    (tmp_path / "c.bin.part").write_bytes(data)
    fetch(server.base + "/c.bin", tmp_path / "c.bin", sha256=hashlib.sha256(data).hexdigest(), log=_quiet)
    assert (tmp_path / "c.bin").read_bytes() == data


def test_retries_5xx_with_exponential_backoff(server, tmp_path):
    server.files["/r.bin"] = b"x" * 10
    server.fail["/r.bin"] = [503, 502, 500]
    sleeps = []
    fetch(server.base + "/r.bin", tmp_path / "r.bin", backoff=1.0, log=_quiet, sleep=sleeps.append)
    assert (tmp_path / "r.bin").read_bytes() == b"x" * 10
    assert sleeps == [1.0, 2.0, 4.0]

    server.fail["/r2.bin"] = [503] * 10
    server.files["/r2.bin"] = b"y"
    with pytest.raises(DownloadError, match=r"r2\.bin: giving up after 2 retries .*HTTP 503.*/r2\.bin"):
        fetch(server.base + "/r2.bin", tmp_path / "r2.bin", retries=2, backoff=0, log=_quiet, sleep=lambda s: None)


def test_connection_refused_is_retried_then_clear_error(tmp_path):
    import socket
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = []
    with pytest.raises(DownloadError, match=r"x\.bin: giving up after 3 retries.*127\.0\.0\.1"):
        fetch(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x.bin", retries=3, backoff=0.1, log=_quiet,
              sleep=sleeps.append)
    assert sleeps == [0.1, 0.2, 0.4]


def test_sha256_mismatch_errors_clearly(server, tmp_path, monkeypatch):
    server.files["/m/species_chrom.csv"] = b"not the official file\n"
    with pytest.raises(DownloadError) as e:
        fetch(server.base + "/m/species_chrom.csv", tmp_path / "species_chrom.csv", sha256="ab" * 32, log=_quiet)
    msg = str(e.value)
    assert "species_chrom.csv: sha256" in msg and "ab" * 32 in msg and server.base in msg and "\n" not in msg
    assert not (tmp_path / "species_chrom.csv").exists() and not (tmp_path / "species_chrom.csv.part").exists()

    # the same through the command, with a known-checksum table entry
    monkeypatch.setitem(dl.KNOWN_FILES, "species_chrom.csv", Known(sha256="ab" * 32))
    res = CliRunner().invoke(download_model_files_command,
                             ["--dest", str(tmp_path / "mf"), "--base-url", server.base + "/m"])
    assert res.exit_code == 2
    assert "ERROR: species_chrom.csv: sha256" in res.output and "Traceback" not in res.output


def test_known_size_mismatch_errors(server, tmp_path):
    server.files["/s.bin"] = b"12345"
    with pytest.raises(DownloadError, match=r"s\.bin: got 5 bytes but 6 known"):
        fetch(server.base + "/s.bin", tmp_path / "s.bin", size=6, log=_quiet)
    assert not (tmp_path / "s.bin").exists()


def test_404_errors_clearly_without_retrying(server, tmp_path):
    with pytest.raises(DownloadError) as e:
        fetch(server.base + "/nope/4layer_model.torch", tmp_path / "4layer_model.torch", log=_quiet)
    msg = str(e.value)
    assert msg.startswith("4layer_model.torch: HTTP 404") and server.base + "/nope/4layer_model.torch" in msg
    assert "--base-url" in msg and "\n" not in msg
    assert len(server.gets("/nope/4layer_model.torch")) == 1

    res = CliRunner().invoke(download_model_files_command,
                             ["--dest", str(tmp_path / "mf"), "--base-url", server.base + "/nope"])
    assert res.exit_code == 2 and "ERROR: species_chrom.csv: HTTP 404" in res.output


def test_tar_path_traversal_and_links_are_refused(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(_tar_gz({"protein_embeddings/ok.pt": b"1", "../evil.txt": b"2"}))
    with pytest.raises(DownloadError, match="unsafe path '../evil.txt'"):
        safe_extract_tar(bad, tmp_path / "out" / "protein_embeddings")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()
    assert not (tmp_path / "out" / "protein_embeddings").exists()

    absolute = tmp_path / "abs.tar.gz"
    absolute.write_bytes(_tar_gz({"/tmp/abs.pt": b"1"}))
    with pytest.raises(DownloadError, match="unsafe path"):
        safe_extract_tar(absolute, tmp_path / "out2")

    link = tmp_path / "link.tar.gz"
    link.write_bytes(_tar_gz({"a.pt": b"1"}, links={"b.pt": "/etc/passwd"}))
    with pytest.raises(DownloadError, match="link or special file"):
        safe_extract_tar(link, tmp_path / "out3")
    assert not (tmp_path / "out3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folders cleaned up

    flat = tmp_path / "flat.tar.gz"  # no top folder: members go straight into the target
    flat.write_bytes(_tar_gz({"x.pt": b"1", "y.pt": b"2"}))
    safe_extract_tar(flat, tmp_path / "out4")
    assert sorted(p.name for p in (tmp_path / "out4").iterdir()) == ["x.pt", "y.pt"]


def test_urls_and_progress_bar():
    urls = dl.model_file_urls("33layer")
    assert urls["33l_8ep_1024t_1280.torch"] == "https://figshare.com/ndownloader/files/43423236"
    assert urls["protein_embeddings.tar.gz"] == "https://figshare.com/ndownloader/files/42715213"
    assert "4layer_model.torch" not in urls
    assert dl.model_file_urls("4layer")["4layer_model.torch"] == "https://figshare.com/ndownloader/files/42706576"
    over = dl.model_file_urls("4layer", base_url="http://m/x/", urls={"all_tokens.torch": "http://o/t"})
    assert over["species_chrom.csv"] == "http://m/x/species_chrom.csv" and over["all_tokens.torch"] == "http://o/t"
    with pytest.raises(DownloadError, match="unknown file"):
        dl.model_file_urls("4layer", urls={"nope": "http://x"})

    stream = io.StringIO()
    p = _Progress("f.bin", 0, 1000, stream=stream, tty=True)
    p.last = -1e9
    p.update(500)
    p.close()
    assert "\r[###############" in stream.getvalue() and "50.0%" in stream.getvalue()
