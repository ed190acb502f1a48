"""Real files through the real pipeline: awkward h5ad files that must work, bad h5ad and model
files that must stop the run at VALIDATE (before any heavy task) with one line saying what, where
and how to fix, a weblog receiver, and a run killed with SIGKILL mid-EMBED then resumed."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import PBMC, make_edge_dataset
from nf_utils import MODEL_DIR, REPO, assert_ok, nextflow_bin, nf_env, run_pipeline

pytestmark = pytest.mark.nextflow
HEAVY = {"PREPARE_SPECIES", "PREPROCESS", "INDEX", "SENTENCES", "EMBED", "MERGE"}


def pbmc(n=120) -> ad.AnnData:
    return ad.read_h5ad(PBMC)[:n].copy()


def write_sheet(root: Path, rows: dict[str, Path], species="human") -> Path:
    sheet = root / "samplesheet.csv"
    sheet.write_text("sample,h5ad,species\n" + "".join(f"{k},{v},{species}\n" for k, v in rows.items()))
    return sheet


def ran(launch: Path) -> set[str]:
    """Names of processes that started a task (from the work dirs' .command.sh)."""
    names = set()
    for sh in (launch / "work").glob("*/*/.command.sh"):
        text = sh.read_text()
        for step in ("prepare-species", "preprocess", "index", "sentences", "embed", "merge", "validate"):
            if f"uce-{step} " in text or f"uce-{step}\n" in text:
                names.add(step.replace("-", "_").upper())
    return names


# ---------------------------------------------------------------- awkward but valid inputs
@pytest.fixture(scope="module")
def awkward_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("awkward")
    d = root / "data"
    d.mkdir()
    a = pbmc()
    raw = a.copy()  # Seurat-style: normalised X, counts in .raw
    raw.raw = a.copy()
    raw.X = sp.csr_matrix(np.log1p(a.X.toarray() / 3.7))
    raw.write_h5ad(d / "raw_counts.h5ad")
    ens = a.copy()  # CELLxGENE-style: Ensembl ids, symbols in var.feature_name
    ens.var["feature_name"] = ens.var_names
    ens.var_names = [f"ENSG{i:011d}" for i in range(ens.n_vars)]
    ens.write_h5ad(d / "ensembl.h5ad")
    dup = a.copy()
    dup.obs_names = [f"cell{i // 2}" for i in range(dup.n_obs)]  # every name twice
    dup.write_h5ad(d / "dup_obs.h5ad")
    make_edge_dataset(d / "zero_cells.h5ad", n_cells=120, zero_cell=True)
    sheet = write_sheet(root, {p.stem: p for p in sorted(d.glob("*.h5ad"))})
    r = run_pipeline(root, "--input", str(sheet), "--outdir", str(root / "results"))
    return root, r


def result(root: Path, sample: str) -> ad.AnnData:
    return ad.read_h5ad(root / "results" / sample / f"{sample}_uce_adata.h5ad")


def test_awkward_inputs_run(awkward_run):
    root, r = awkward_run
    assert_ok(r)
    for s in ("raw_counts", "ensembl", "dup_obs", "zero_cells"):
        a = result(root, s)
        assert np.allclose(np.linalg.norm(a.obsm["X_uce"], axis=1), 1, atol=1e-5)


def test_counts_found_in_raw(awkward_run):
    root, _ = awkward_run
    st = result(root, "raw_counts").uns["uce"]["preprocess"]
    assert st["counts_source"] == "raw/X"
    # the counts, not the normalised X, are what got embedded: same as the plain file's cells
    assert result(root, "raw_counts").n_obs == result(root, "dup_obs").n_obs


def test_ensembl_ids_use_feature_name(awkward_run):
    root, _ = awkward_run
    a = result(root, "ensembl")
    assert a.uns["uce"]["preprocess"]["gene_symbols_from"] == "feature_name"
    assert a.var_names[0] == pbmc().var_names[0] and a.var["original_var_name"].iloc[0].startswith("ENSG")


def test_duplicate_obs_names_made_unique(awkward_run):
    root, _ = awkward_run
    a = result(root, "dup_obs")
    assert a.obs_names.is_unique and a.uns["uce"]["preprocess"]["duplicate_obs_names"] == a.n_obs // 2
    assert list(a.obs["original_obs_name"][:2]) == ["cell0", "cell0"]


def test_zero_and_few_gene_cells_dropped_and_counted(awkward_run):
    root, _ = awkward_run
    st = result(root, "zero_cells").uns["uce"]["preprocess"]
    assert st["cells_dropped_zero_counts"] == 1 and st["cells_dropped_min_genes"] == 5
    assert st["cells_kept"] == 120 and "zero_embedding_cell" not in result(root, "zero_cells").obs_names


# ---------------------------------------------------------------- bad h5ad files
@pytest.fixture(scope="module")
def bad_h5ad_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_h5ad")
    d = root / "data"
    d.mkdir()
    (d / "not_h5ad.h5ad").write_text("sample,gene\nA,1\n")
    shutil.copyfile(PBMC, d / "truncated.h5ad")
    with open(d / "truncated.h5ad", "r+b") as f:
        f.truncate(os.path.getsize(PBMC) // 3)
    a = pbmc()
    norm = a.copy()
    norm.X = sp.csr_matrix(np.log1p(a.X.toarray() / 3.7))
    norm.write_h5ad(d / "normalised.h5ad")
    ens = a.copy()
    ens.var_names = [f"ENSG{i:011d}" for i in range(ens.n_vars)]
    ens.write_h5ad(d / "ensembl_no_symbols.h5ad")
    few = a.copy()
    few.var_names = [f"GENE{i}" for i in range(few.n_vars)]
    few.var_names.values[:20] = list(a.var_names[:20])
    few.write_h5ad(d / "few_genes.h5ad")
    sheet = write_sheet(root, {p.stem: p for p in sorted(d.glob("*.h5ad"))})
    r = run_pipeline(root, "--input", str(sheet), "--outdir", str(root / "results"))
    return root, r


@pytest.mark.parametrize("sample,words", [
    ("not_h5ad", "not a readable h5ad (HDF5) file"),
    ("truncated", "not a readable h5ad (HDF5) file"),
    ("normalised", "no raw counts found"),
    ("ensembl_no_symbols", "var_names are Ensembl ids and no gene symbol column was found"),
    ("few_genes", "of 765 genes match"),
])
def test_bad_h5ad_stops_at_validate(bad_h5ad_run, sample, words):
    root, r = bad_h5ad_run
    assert r.returncode != 0
    # one line per bad dataset, naming the sample and the samplesheet's path (test_validate_launch.py)
    line = next((l.strip() for l in r.stdout.splitlines()
                 if f"VALIDATE: sample '{sample}'" in l and f"{sample}.h5ad" in l and words in l), None)
    assert line, f"no one-line error for {sample} containing '{words}':\n{r.stdout[-4000:]}"
    assert len(line) < 400
    assert not (ran(root) & HEAVY), f"heavy tasks ran: {ran(root)}"


def test_no_cells_left_after_filtering(tmp_path):
    a = pbmc()
    a.X = a.X.multiply(sp.random(a.n_obs, a.n_vars, density=0.02, random_state=0) > 0).tocsr()  # < 25 genes per cell
    a.write_h5ad(tmp_path / "sparse.h5ad")
    r = run_pipeline(tmp_path, "--input", str(write_sheet(tmp_path, {"sparse": tmp_path / "sparse.h5ad"})),
                     "--outdir", str(tmp_path / "results"), "--min_cells", "1")
    assert r.returncode != 0 and "no cells left after filtering" in r.stdout, r.stdout[-3000:]
    assert "EMBED" not in ran(tmp_path)


# ---------------------------------------------------------------- bad model files
def model_copy(root: Path) -> Path:
    dest = root / "model_files"
    shutil.copytree(MODEL_DIR, dest)
    return dest


def bad_model_cases(root: Path) -> dict:
    cases = {}
    m = model_copy(root / "missing")
    (m / "species_chrom.csv").unlink()
    cases["missing_file"] = (["--model_dir", str(m)], "species_chrom.csv")
    m = model_copy(root / "notckpt")
    torch.save({"weights": torch.zeros(3)}, m / "4layer_model.torch")
    cases["not_a_checkpoint"] = (["--model_dir", str(m)], "not a UCE checkpoint")
    m = model_copy(root / "width")
    rows = torch.load(MODEL_DIR / "all_tokens.torch").shape[0]
    torch.save(torch.zeros(rows, 7), m / "all_tokens.torch")  # the layout holds; the width does not
    cases["token_width"] = (["--model_dir", str(m)], "token width 7 does not match")
    cases["species"] = (["--model_dir", str(MODEL_DIR)], "species 'dog' is not in")
    return cases


@pytest.mark.parametrize("case", ["missing_file", "not_a_checkpoint", "token_width", "species"])
def test_bad_model_files_stop_at_validate(case, tmp_path):
    """Missing files stop the launch; the species, at VALIDATE; the checkpoint, at PREPARE_SPECIES (the only
    task that reads it, which every dataset of the species waits for): before any heavy step, in one line."""
    args, words = bad_model_cases(tmp_path)[case]
    sheet = write_sheet(tmp_path, {"pbmc": PBMC}, species="dog" if case == "species" else "human")
    r = run_pipeline(tmp_path, "--input", str(sheet), "--outdir", str(tmp_path / "results"), *args)
    assert r.returncode != 0
    assert any(words in l and len(l) < 400 for l in r.stdout.splitlines()), r.stdout[-4000:]
    allowed = {"PREPARE_SPECIES"} if case in ("not_a_checkpoint", "token_width") else set()
    assert not (ran(tmp_path) & (HEAVY - allowed)), f"heavy tasks ran: {ran(tmp_path)}"


# ---------------------------------------------------------------- monitoring
def weblog_plugin_installed() -> bool:
    """Nextflow 24.10 sends -with-weblog events through the nf-weblog plugin, which is fetched from
    the plugin registry at run time; offline it must already be in $NXF_HOME/plugins."""
    from nf_utils import CACHE
    homes = [Path(os.environ["NXF_HOME"])] if "NXF_HOME" in os.environ else []
    homes += [CACHE / "nextflow" / "home", Path.home() / ".nextflow"]
    return any(any((h / "plugins").glob("nf-weblog-*")) for h in homes if (h / "plugins").exists())


@pytest.mark.skipif(not weblog_plugin_installed(), reason="the nf-weblog plugin is not installed and cannot be "
                    "downloaded offline (Nextflow 24.10 moved -with-weblog into it; the registry is unreachable here)")
def test_weblog_receives_started_and_completed(tmp_path):
    events = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            events.append(json.loads(body).get("event"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = run_pipeline(tmp_path, "-stub-run", "--outdir", str(tmp_path / "results"),
                         "-with-weblog", f"http://127.0.0.1:{server.server_address[1]}/")
        assert_ok(r)
    finally:
        server.shutdown()
    assert "started" in events and "completed" in events, events
    assert "process_completed" in events


# ---------------------------------------------------------------- no data loss
def test_sigkill_during_embed_then_resume(tmp_path):
    """Kill Nextflow and its tasks mid-EMBED; -resume completes with the output of an
    uninterrupted run (compat mode: equal to `uce run`, bit for bit)."""
    args = ["--outdir", str(tmp_path / "results"), "--compat", "reference", "--shard_size", "200"]
    cmd = [nextflow_bin(), "run", str(REPO), "-profile", "test", "-ansi-log", "false", "-w", str(tmp_path / "work"), *args]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=nf_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 900
    try:
        while time.time() < deadline and p.poll() is None:
            if any("uce-embed" in sh.read_text() and (sh.parent / ".command.begin").exists()
                   for sh in (tmp_path / "work").glob("*/*/.command.sh")):
                time.sleep(2)
                break
            time.sleep(0.5)
        assert p.poll() is None, "the run ended before EMBED started"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    final = tmp_path / "results" / "pbmc_demo" / "pbmc_demo_uce_adata.h5ad"
    assert not final.exists()
    r = run_pipeline(tmp_path, "-resume", *args)
    assert_ok(r)
    assert "Cached process" in r.stdout, "tasks finished before the kill must be reused"
    from conftest import run_uce
    run_uce("run", "--input", PBMC, "--species", "human", "--model-dir", MODEL_DIR, "--compat", "reference",
            "--output", tmp_path / "uce_run.h5ad")
    np.testing.assert_array_equal(ad.read_h5ad(final).obsm["X_uce"], ad.read_h5ad(tmp_path / "uce_run.h5ad").obsm["X_uce"])
