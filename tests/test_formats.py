"""Input formats (issue 12, item 6): AnnData .zarr, Cell Ranger v3 .h5 and mtx folders, and Ensembl
ids with version suffixes give the same X_uce as the h5ad of the same counts. Each file is written
by its own library (anndata; h5py in Cell Ranger's exact layout; scipy.io.mmwrite + gzip'd tsv).
Malformed files and out-of-scope formats (loom, Seurat) stop with one line and exit status 2."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from click.testing import CliRunner

from conftest import PBMC, run_uce

N_CELLS = 150
N_ADT = 3  # Antibody Capture features mixed in: must be dropped, so nothing changes


def invoke(*args) -> tuple[int, str]:
    from uce_nf.cli import main
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("ERROR")]


def fake_ids(n: int) -> list[str]:
    """Fake but consistent Ensembl ids with version suffixes."""
    return [f"ENSG{100000 + i:011d}.{i % 17 + 1}" for i in range(n)]


# ---------------------------------------------------------------- writers, one per format
def write_cellranger_h5(path: Path, X: sp.csr_matrix, barcodes, names, ids, types) -> Path:
    """Cell Ranger v3+ filtered_feature_bc_matrix.h5: CSC of features x barcodes (= CSR of cells)."""
    m = sp.csr_matrix(X).astype(np.int32)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        g.create_dataset("data", data=m.data, compression="gzip")
        g.create_dataset("indices", data=m.indices.astype(np.int64), compression="gzip")
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([m.shape[1], m.shape[0]], dtype=np.int32))
        feat = g.create_group("features")
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        feat.create_dataset("feature_type", data=np.array(types, dtype="S"))
        feat.create_dataset("genome", data=np.array([b"GRCh38"] * len(names)))
        feat.create_dataset("id", data=np.array(ids, dtype="S"))
        feat.create_dataset("name", data=np.array(names, dtype="S"))
        f.attrs.update({"filetype": "matrix", "library_ids": np.array([b"demo"]), "version": 2})
    return path


def write_mtx(folder: Path, X: sp.csr_matrix, barcodes, names, ids, types, gz: bool = True) -> Path:
    """Cell Ranger v3 mtx folder: matrix.mtx.gz (features x cells), features.tsv.gz, barcodes.tsv.gz."""
    folder.mkdir(parents=True)
    ext = ".gz" if gz else ""
    scipy.io.mmwrite(folder / "matrix.mtx", sp.coo_matrix(X.T).astype(np.int64), field="integer")
    opener = (lambda p: gzip.open(p, "wt")) if gz else (lambda p: open(p, "w"))
    with opener(folder / f"features.tsv{ext}") as fh:
        fh.writelines(f"{i}\t{n}\t{t}\n" for i, n, t in zip(ids, names, types))
    with opener(folder / f"barcodes.tsv{ext}") as fh:
        fh.writelines(f"{b}\n" for b in barcodes)
    if gz:
        with open(folder / "matrix.mtx", "rb") as src, gzip.open(folder / "matrix.mtx.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        (folder / "matrix.mtx").unlink()
    return folder


def with_adt(X: sp.csr_matrix, symbols, seed: int = 0):
    """The counts plus N_ADT antibody features interleaved; (X, names, ids, types)."""
    rng = np.random.default_rng(seed)
    adt = sp.csr_matrix(rng.integers(0, 50, (X.shape[0], N_ADT)).astype(np.float32))
    X2 = sp.hstack([X[:, :5], adt, X[:, 5:]], format="csr")
    names = list(symbols[:5]) + [f"CD{i}_TotalSeqB" for i in range(N_ADT)] + list(symbols[5:])
    ids = fake_ids(len(symbols))
    ids = ids[:5] + [f"CD{i}" for i in range(N_ADT)] + ids[5:]
    types = ["Gene Expression"] * 5 + ["Antibody Capture"] * N_ADT + ["Gene Expression"] * (len(symbols) - 5)
    return X2, names, ids, types


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The demo's first pbmc cells, in every format, from the same counts."""
    d = tmp_path_factory.mktemp("formats")
    a = ad.read_h5ad(PBMC)[:N_CELLS].copy()
    X = sp.csr_matrix(a.X, dtype=np.float32)
    barcodes, symbols = list(a.obs_names), list(a.var_names)
    ref = ad.AnnData(X, obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=symbols))
    ref.write_h5ad(d / "ref.h5ad")
    z = ad.AnnData(X.copy(), obs=pd.DataFrame({"cell_type": a.obs["bulk_labels"].to_numpy()}, index=barcodes),
                   var=pd.DataFrame(index=symbols))
    z.write_zarr(d / "pbmc.zarr")
    X2, names, ids, types = with_adt(X, symbols)
    paths = {
        "h5ad": d / "ref.h5ad",
        "zarr": d / "pbmc.zarr",
        "cellranger_h5": write_cellranger_h5(d / "filtered_feature_bc_matrix.h5", X2, barcodes, names, ids, types),
        "mtx": write_mtx(d / "filtered_feature_bc_matrix", X2, barcodes, names, ids, types),
        "mtx_plain": write_mtx(d / "plain_mtx", X, barcodes, symbols, fake_ids(len(symbols)),
                               ["Gene Expression"] * len(symbols), gz=False),
    }
    # zarr variants: dense normalised X with the counts in .raw; CSC counts in a layer
    zr = ad.AnnData(np.log1p(X.toarray() / 3.7), obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=symbols))
    zr.raw = ad.AnnData(X.copy(), obs=zr.obs, var=zr.var)
    zr.write_zarr(d / "raw_dense.zarr")
    zl = ad.AnnData(np.log1p(X.toarray()), obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=symbols),
                    layers={"counts": sp.csc_matrix(X)})
    zl.X = sp.csr_matrix(zl.X)
    zl.write_zarr(d / "csc_layer.zarr")
    paths["zarr_raw_dense"], paths["zarr_csc_layer"] = d / "raw_dense.zarr", d / "csc_layer.zarr"
    ens = ad.AnnData(X.copy(), obs=pd.DataFrame(index=barcodes),
                     var=pd.DataFrame({"gene_symbols": symbols}, index=fake_ids(len(symbols))))
    ens.write_h5ad(d / "ensembl_versions.h5ad")
    paths["ensembl_versions"] = d / "ensembl_versions.h5ad"
    return d, paths


def embed(path: Path, out: Path, *extra) -> ad.AnnData:
    from conftest import MODEL_DIR
    run_uce("run", "--input", path, "--species", "human", "--model-dir", MODEL_DIR, "--workers", 1, "--seed", 3,
            "--output", out, *extra)
    return ad.read_h5ad(out)


@pytest.fixture(scope="module")
def reference(data, model_dir):
    d, paths = data
    return embed(paths["h5ad"], d / "ref_uce.h5ad")


@pytest.mark.parametrize("fmt", ["zarr", "zarr_raw_dense", "zarr_csc_layer", "cellranger_h5", "mtx", "mtx_plain",
                                 "ensembl_versions"])
def test_same_x_uce_as_the_h5ad(fmt, data, reference, tmp_path):
    _, paths = data
    out = embed(paths[fmt], tmp_path / f"{fmt}_uce.h5ad")
    assert list(out.obs_names) == list(reference.obs_names)
    assert list(out.var_names) == list(reference.var_names)  # symbols; antibody features dropped
    assert np.array_equal(out.obsm["X_uce"], reference.obsm["X_uce"]), fmt  # bit-identical
    st = out.uns["uce"]["preprocess"]
    assert st["genes_in"] == reference.uns["uce"]["preprocess"]["genes_in"]  # no Antibody Capture rows
    assert st["counts_source"] == {"zarr_raw_dense": "raw/X", "zarr_csc_layer": "layers/counts"}.get(fmt, "X")
    if fmt == "ensembl_versions":
        assert st["gene_symbols_from"] == "gene_symbols"
        assert out.var["original_var_name"].iloc[0].startswith("ENSG") and "." in out.var["original_var_name"].iloc[0]


def test_embeddings_mode_reads_the_converted_input(data, reference, tmp_path):
    """--output-mode embeddings reads the input's obs (MERGE): every barcode, in input order."""
    _, paths = data
    out = embed(paths["mtx"], tmp_path / "mtx_uce.h5ad", "--output-mode", "embeddings")
    assert out.n_obs == N_CELLS and list(out.obs_names) == list(ad.read_h5ad(paths["h5ad"]).obs_names)
    emb = out[out.obs["uce_embedded"].to_numpy()]
    assert np.array_equal(emb.obsm["X_uce"], reference.obsm["X_uce"])


def test_validate_reads_each_format(data, model_dir, tmp_path):
    _, paths = data
    v2 = shutil.copytree(paths["mtx_plain"], tmp_path / "v2_mtx")  # Cell Ranger 2: genes.tsv, two columns
    feats = pd.read_csv(v2 / "features.tsv", sep="\t", header=None)
    feats[[0, 1]].to_csv(v2 / "genes.tsv", sep="\t", header=False, index=False)
    (v2 / "features.tsv").unlink()
    for fmt, path in {**paths, "mtx_v2": v2}.items():
        code, out = invoke("validate", "--input", path, "--species", "human", "--model-dir", model_dir,
                           "--output", tmp_path / f"{fmt}.json")
        assert code == 0, (fmt, out)
        ds = json.loads((tmp_path / f"{fmt}.json").read_text())["dataset"]
        assert (ds["cells"], ds["genes"]) == (N_CELLS, 765), (fmt, ds)


def test_ensembl_version_suffixes(tmp_path):
    """Detected with their versions, and stripped before the lookup (symbols pass unchanged)."""
    from uce_nf.io import UserError
    from uce_nf.preprocess import gene_symbols, strip_versions
    ids = fake_ids(200)
    with pytest.raises(UserError, match="var_names are Ensembl ids and no gene symbol column"):
        gene_symbols(pd.DataFrame(index=ids), tmp_path, None)
    got, source = gene_symbols(pd.DataFrame({"gene_ids": ids}, index=[f"G{i}" for i in range(200)]), tmp_path,
                               "gene_ids")
    assert source == "gene_ids" and got[0] == "ENSG00000100000" and "." not in "".join(got)
    assert list(strip_versions(np.array(["ENSG00000141510.17", "TP53", "ENSG00000182378.14_PAR_Y", "RP11-34P13.7",
                                         "ENSMUSG00000000001"]), tmp_path)) == [
        "ENSG00000141510", "TP53", "ENSG00000182378_PAR_Y", "RP11-34P13.7", "ENSMUSG00000000001"]


def test_detection_is_by_content_not_name(data, tmp_path):
    from uce_nf import formats
    _, paths = data
    shutil.copyfile(paths["cellranger_h5"], tmp_path / "counts.h5ad")  # a Cell Ranger file, misnamed
    shutil.copyfile(paths["h5ad"], tmp_path / "anndata.h5")  # an h5ad, named .h5
    assert formats.detect(tmp_path / "counts.h5ad") == formats.CELLRANGER_H5
    assert formats.detect(tmp_path / "anndata.h5") == formats.H5AD
    assert formats.detect(paths["zarr"]) == formats.ZARR and formats.detect(paths["mtx"]) == formats.MTX


def test_conversion_leaves_nothing_behind(data, tmp_path, monkeypatch):
    """Inputs are read-only and the converted h5ad lives only as long as its open handle."""
    from uce_nf.io import open_h5ad
    _, paths = data
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    before = sorted(p.name for p in paths["mtx"].iterdir())
    with open_h5ad(paths["mtx"]) as f:
        assert f["X"].attrs["shape"].tolist() == [N_CELLS, 765]
    assert not list(tmp_path.iterdir()) and sorted(p.name for p in paths["mtx"].iterdir()) == before


# ---------------------------------------------------------------- malformed and out of scope
def malformed(data) -> dict[str, tuple[Path, str]]:
    d, paths = data
    bad = d / "bad"
    if bad.exists():
        shutil.rmtree(bad)
    bad.mkdir()
    shutil.copyfile(paths["cellranger_h5"], bad / "no_names.h5")
    with h5py.File(bad / "no_names.h5", "r+") as f:
        del f["matrix/features/name"]
    shutil.copyfile(paths["cellranger_h5"], bad / "short_barcodes.h5")
    with h5py.File(bad / "short_barcodes.h5", "r+") as f:
        b = f["matrix/barcodes"][:-1]
        del f["matrix/barcodes"]
        f["matrix/barcodes"] = b
    shutil.copytree(paths["mtx"], bad / "no_barcodes")
    (bad / "no_barcodes" / "barcodes.tsv.gz").unlink()
    shutil.copytree(paths["mtx"], bad / "wrong_features")
    with gzip.open(bad / "wrong_features" / "features.tsv.gz", "wt") as fh:
        fh.write("ENSG1\tA\tGene Expression\n")
    shutil.copytree(paths["mtx"], bad / "bad_matrix")
    with gzip.open(bad / "bad_matrix" / "matrix.mtx.gz", "wt") as fh:
        fh.write("not a matrix market file\n")
    (bad / "broken.zarr").mkdir()
    (bad / "broken.zarr" / ".zgroup").write_text('{"zarr_format": 2}')
    (bad / "empty_folder").mkdir()
    with h5py.File(bad / "other.h5", "w") as f:
        f["numbers"] = np.arange(3)
    return {
        "no_names": (bad / "no_names.h5", "no matrix/features/name"),
        "short_barcodes": (bad / "short_barcodes.h5", "malformed Cell Ranger h5"),
        "no_barcodes": (bad / "no_barcodes", "no barcodes.tsv.gz or barcodes.tsv"),
        "wrong_features": (bad / "wrong_features", "the three files must come from the same matrix"),
        "bad_matrix": (bad / "bad_matrix", "not a readable Matrix Market file"),
        "broken_zarr": (bad / "broken.zarr", "zarr store is not AnnData"),
        "empty_folder": (bad / "empty_folder", "neither an AnnData zarr store"),
        "other_hdf5": (bad / "other.h5", "neither AnnData"),
    }


def out_of_scope(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    loom = tmp_path / "cells.loom"
    with h5py.File(loom, "w") as f:  # loom's layout: /matrix (genes x cells), /row_attrs, /col_attrs
        f["matrix"] = np.zeros((4, 3), np.float32)
        f.create_group("row_attrs")["Gene"] = np.array([b"A", b"B", b"C", b"D"])
        f.create_group("col_attrs")["CellID"] = np.array([b"c1", b"c2", b"c3"])
    shutil.copyfile(loom, tmp_path / "loom_content.h5")
    with gzip.open(tmp_path / "seurat.rds", "wb") as fh:  # R's gzip'd XDR serialisation header
        fh.write(b"X\n\x00\x00\x00\x03")
    shutil.copyfile(tmp_path / "seurat.rds", tmp_path / "seurat_content.dat")
    (tmp_path / "obj.h5seurat").write_bytes(b"")
    return {"loom": (loom, "read_loom"), "loom_content": (tmp_path / "loom_content.h5", "read_loom"),
            "rds": (tmp_path / "seurat.rds", "sceasy"), "rds_content": (tmp_path / "seurat_content.dat", "SeuratDisk"),
            "h5seurat": (tmp_path / "obj.h5seurat", "SeuratDisk::Convert")}


def test_bad_inputs_one_line_exit_2(data, model_dir, tmp_path):
    run_uce("prepare-species", "--species", "human", "--model-dir", model_dir, "--output", tmp_path / "h.pt")
    cases = {**malformed(data), **out_of_scope(tmp_path)}
    for case, (path, words) in cases.items():
        for step in ("validate", "preprocess"):
            args = (["validate", "--input", path, "--species", "human", "--model-dir", model_dir,
                     "--output", tmp_path / f"{case}.json"] if step == "validate" else
                    ["preprocess", "--input", path, "--species-file", tmp_path / "h.pt",
                     "--output", tmp_path / f"{case}.h5ad", "--stats", tmp_path / f"{case}.stats.json"])
            code, out = invoke(*args)
            lines = error_lines(out)
            assert code == 2 and len(lines) == 1 and "Traceback" not in out, (case, step, out)
            assert str(path) in lines[0] and words in lines[0], (case, step, lines[0])
            assert not (tmp_path / f"{case}.h5ad").exists()  # nothing half-written


# ---------------------------------------------------------------- through the pipeline
@pytest.mark.nextflow
@pytest.mark.slow
def test_pipeline_runs_cellranger_h5_and_mtx_folder(data, reference, tmp_path):
    """-profile test with a Cell Ranger h5 and an mtx folder in the samplesheet's h5ad column:
    folders are staged as folders, both give the cells the h5ad of the same counts gives."""
    from nf_utils import assert_ok, ensure_demo, run_pipeline
    ensure_demo()
    _, paths = data
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"sample,h5ad,species\ncr,{paths['cellranger_h5']},human\nmtx,{paths['mtx']}/,human\n")
    r = run_pipeline(tmp_path, "--input", str(sheet), "--outdir", str(tmp_path / "out"))
    assert_ok(r)
    res = {s: ad.read_h5ad(tmp_path / "out" / s / f"{s}_uce_adata.h5ad") for s in ("cr", "mtx")}
    for s, a in res.items():
        assert list(a.obs_names) == list(reference.obs_names), s
        assert np.allclose(np.linalg.norm(a.obsm["X_uce"], axis=1), 1, atol=1e-5)
    assert np.array_equal(res["cr"].obsm["X_uce"], res["mtx"].obsm["X_uce"])  # same counts, same seed


@pytest.mark.nextflow
def test_samplesheet_loom_gets_the_conversion_hint(tmp_path):
    from nf_utils import make_fake_inputs, run_pipeline
    _, models = make_fake_inputs(tmp_path)
    (tmp_path / "data" / "cells.loom").touch()
    sheet = tmp_path / "loom.csv"
    sheet.write_text("sample,h5ad,species\ns1,data/a.h5ad,human\ns2,data/cells.loom,human\n")
    r = run_pipeline(tmp_path, "-stub-run", "--input", str(sheet), "--model_dir", str(models),
                     "--outdir", str(tmp_path / "out"))
    assert r.returncode != 0 and "Submitted process" not in r.stdout, r.stdout
    lines = [line for line in r.stdout.splitlines() if "Samplesheet error" in line]
    assert lines and "loom.csv line 3" in lines[0] and "anndata.read_loom('in.loom').write_h5ad" in lines[0], r.stdout
