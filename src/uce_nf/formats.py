"""Input formats, detected by content (HDF5 groups, folder contents), not by name alone.

- AnnData ``.h5ad``: read as it is, nothing converted.
- AnnData ``.zarr`` (zarr format 2, a folder with .zgroup/.zattrs): X, raw, layers streamed row
  chunk by row chunk; obs, var and obsm copied.
- Cell Ranger v3+ ``filtered_feature_bc_matrix.h5``: ``matrix/{data,indices,indptr,shape}`` is CSC
  of features x barcodes, i.e. CSR of cells x features, so rows are copied in chunks; symbols
  from ``features/name``; only ``Gene Expression`` features are kept.
- Cell Ranger mtx folders (matrix.mtx(.gz), features.tsv(.gz) or genes.tsv(.gz), barcodes.tsv(.gz)):
  symbols from the 2nd column, the feature type from the 3rd; read whole (mtx is text).

Every non-h5ad input is converted into a private h5ad (CSR, var_names = gene symbols, obs_names =
barcodes) written atomically under $TMPDIR, never next to the input, and opened at once; the file is
unlinked as soon as it is open, so it lives exactly as long as the handle and nothing is left
behind. Every step then reads the one layout it knows.
Loom and Seurat files are out of scope: a one-line error says how to convert them.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .io import CSRWriter, UserError, atomic_path

log = logging.getLogger(__name__)

H5AD, ZARR, CELLRANGER_H5, MTX = "h5ad", "zarr", "Cell Ranger h5", "mtx folder"
ACCEPTED = ("an AnnData .h5ad file or .zarr folder, a Cell Ranger filtered_feature_bc_matrix.h5 (v3+) or a "
            "Cell Ranger mtx folder (matrix.mtx(.gz), features.tsv(.gz) or genes.tsv, barcodes.tsv(.gz))")
GENE_EXPRESSION = "Gene Expression"
CHUNK = 8192
MTX_FILES = {"matrix": ("matrix.mtx.gz", "matrix.mtx"),
             "features": ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"),
             "barcodes": ("barcodes.tsv.gz", "barcodes.tsv")}
LOOM_HINT = ("Loom files are not read directly; convert it to h5ad first, e.g. python -c \"import anndata; "
             "anndata.read_loom('in.loom').write_h5ad('out.h5ad')\"")
SEURAT_HINT = ("Seurat files (.rds, .h5seurat) are not read; convert to h5ad first, e.g. in R "
               "sceasy::convertFormat(obj, from='seurat', to='anndata', outFile='out.h5ad') or "
               "SeuratDisk::SaveH5Seurat(obj, 'out.h5seurat'); SeuratDisk::Convert('out.h5seurat', dest='h5ad')")
OUT_OF_SCOPE = {".loom": LOOM_HINT, ".rds": SEURAT_HINT, ".h5seurat": SEURAT_HINT, ".rda": SEURAT_HINT,
                ".rdata": SEURAT_HINT}


def detect(path: Path) -> str:
    """The format of `path` (H5AD, ZARR, CELLRANGER_H5 or MTX), or a one-line UserError."""
    name = path.name.lower()
    for suffix, hint in OUT_OF_SCOPE.items():
        if name.endswith(suffix):
            raise UserError(f"{path}: {hint}")
    if path.is_dir():
        if any((path / m).exists() for m in (".zgroup", ".zattrs", "zarr.json")):
            return ZARR
        if _first(path, MTX_FILES["matrix"]):
            return MTX
        raise UserError(f"{path}: a folder that is neither an AnnData zarr store (.zgroup/.zattrs) nor a Cell Ranger "
                        f"mtx folder (no matrix.mtx or matrix.mtx.gz in it); the input must be {ACCEPTED}")
    if not path.is_file():
        return H5AD  # open_h5ad says "file not found"
    if h5py.is_hdf5(path):
        try:
            with h5py.File(path, "r") as f:
                keys = set(f.keys())
                matrix = f.get("matrix")
                grouped = isinstance(matrix, h5py.Group)
        except OSError:
            return H5AD  # truncated: open_h5ad's message names it
        if keys & {"X", "raw", "layers"}:
            return H5AD
        if grouped:
            return CELLRANGER_H5
        if matrix is not None and "row_attrs" in keys:
            raise UserError(f"{path}: {LOOM_HINT}")
        if "assays" in keys:
            raise UserError(f"{path}: {SEURAT_HINT}")
        if len(keys) == 1 and {"barcodes", "genes"} <= set(_subkeys(path, next(iter(keys)))):
            raise UserError(f"{path}: a Cell Ranger v2 h5 (genome group '{next(iter(keys))}') is not read; "
                            "convert it with scanpy: scanpy.read_10x_h5('in.h5').write_h5ad('out.h5ad'), or use the "
                            "mtx folder")
        raise UserError(f"{path}: HDF5 file is neither AnnData (no X, raw or layers) nor a Cell Ranger v3+ matrix (no "
                        f"group 'matrix'; top level: {', '.join(sorted(keys)) or 'empty'}); the input must be {ACCEPTED}")
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as fh:
                inner = fh.read(5)
        except OSError:
            inner = b""
        if inner[:2] in (b"X\n", b"A\n", b"B\n") or inner.startswith(b"RDX"):  # R serialisation
            raise UserError(f"{path}: {SEURAT_HINT}")
    if name.endswith((".mtx", ".mtx.gz")):
        raise UserError(f"{path}: a bare matrix.mtx is not enough; give the folder that holds matrix.mtx(.gz), "
                        "features.tsv(.gz) and barcodes.tsv(.gz)")
    if not name.endswith(".h5ad"):
        raise UserError(f"{path}: not an HDF5 file, a zarr store or an mtx folder; the input must be {ACCEPTED}")
    return H5AD  # a broken .h5ad: open_h5ad's message says so


def _subkeys(path: Path, key: str) -> list[str]:
    with h5py.File(path, "r") as f:
        g = f[key]
        return list(g.keys()) if isinstance(g, h5py.Group) else []


def _first(folder: Path, names) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def open_converted(path: Path, fmt: str, rows: int | None = None) -> h5py.File:
    """Convert `path` into a private h5ad and return it open read-only (already unlinked).
    rows: write only the first `rows` cells' counts (the rest stay empty rows) for checks that
    read metadata and a sample of rows; shapes, obs and var are always complete."""
    convert = {ZARR: _convert_zarr, CELLRANGER_H5: _convert_cellranger_h5, MTX: _convert_mtx}[fmt]
    d = Path(tempfile.mkdtemp(prefix="uce-input-"))
    try:
        final = d / "converted.h5ad"
        with atomic_path(final, suffix=".h5ad") as tmp, h5py.File(tmp, "w") as out:
            out.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            convert(path, out, rows)
        f = h5py.File(final, "r")
    finally:
        shutil.rmtree(d, ignore_errors=True)  # the open handle keeps the data readable
    log.info("%s: read as %s%s", path, fmt, f" (first {rows} cells' counts)" if rows else "")
    return f


# ------------------------------------------------------------------ writing
def _write_matrix(parent: h5py.Group, key: str, blocks: Iterator[sp.csr_matrix], shape, dtype, rows=None) -> None:
    """CSR of `shape` from row blocks; after `rows` rows the remaining rows are written empty."""
    n_rows, n_cols = shape
    limit = n_rows if rows is None else min(rows, n_rows)
    w = CSRWriter(parent, key, n_cols, dtype, compression=None)  # a private, short-lived file: speed first
    for m in blocks:
        if w.n_rows >= limit:
            break
        m = m[: limit - w.n_rows].astype(dtype)
        m.sort_indices()
        w.append(m)
    if w.n_rows < limit:
        raise UserError(f"matrix '{key}' has {w.n_rows} rows, {n_rows} expected")
    if w.n_rows < n_rows:
        w.append(sp.csr_matrix((n_rows - w.n_rows, n_cols), dtype=dtype))
    w.close()


def _write_frames(out: h5py.File, obs: pd.DataFrame, var: pd.DataFrame, obsm: dict | None = None) -> None:
    from .preprocess import write_elem
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicated symbols are kept on purpose (as in an h5ad)
        for key, value in (("obs", obs), ("var", var), ("obsm", obsm or {}), ("uns", {}), ("varm", {}),
                           ("obsp", {}), ("varp", {})):
            write_elem(out, key, value)


def _strings(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


# ------------------------------------------------------------------ Cell Ranger h5
def _convert_cellranger_h5(path: Path, out: h5py.File, rows) -> None:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: not a readable Cell Ranger h5 ({str(e).splitlines()[0]})") from None
    with f:
        m = f["matrix"]
        fix = "re-export it with Cell Ranger >= 3 (filtered_feature_bc_matrix.h5) or give the mtx folder"
        for k in ("data", "indices", "indptr", "shape", "barcodes", "features"):
            if k not in m:
                raise UserError(f"{path}: Cell Ranger h5 has no matrix/{k}; {fix}")
        feats = m["features"]
        if "name" not in feats:
            raise UserError(f"{path}: Cell Ranger h5 has no matrix/features/name (gene symbols); {fix}")
        n_feat, n_bc = (int(s) for s in m["shape"][:])
        names = _strings(feats["name"][:])
        ids = _strings(feats["id"][:]) if "id" in feats else names
        types = _strings(feats["feature_type"][:]) if "feature_type" in feats else np.full(n_feat, GENE_EXPRESSION, object)
        barcodes = _strings(m["barcodes"][:])
        indptr = m["indptr"][:].astype(np.int64)
        problems = [f"{len(x)} {what}, {n} in matrix/shape" for x, what, n in
                    ((names, "feature names", n_feat), (types, "feature types", n_feat), (barcodes, "barcodes", n_bc),
                     (indptr, "indptr entries", n_bc + 1)) if len(x) != n]
        if not problems and (indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != m["data"].shape[0]
                             or m["indices"].shape[0] != m["data"].shape[0]):
            problems.append("matrix/indptr does not match data and indices")
        if problems:
            raise UserError(f"{path}: malformed Cell Ranger h5: {'; '.join(problems)}; {fix}")
        ge = np.flatnonzero(types == GENE_EXPRESSION)
        if not len(ge):
            raise UserError(f"{path}: no '{GENE_EXPRESSION}' features (types: {', '.join(sorted(set(types)))}); "
                            "UCE embeds gene expression")
        if len(ge) < n_feat:
            log.info("%s: keeping the %d '%s' features of %d", path, len(ge), GENE_EXPRESSION, n_feat)
        var = pd.DataFrame({"gene_ids": ids[ge], "feature_types": types[ge]}, index=pd.Index(names[ge]))
        if "genome" in feats:
            var["genome"] = _strings(feats["genome"][:])[ge]

        def blocks():
            data, indices = m["data"], m["indices"]
            for s in range(0, n_bc, CHUNK):
                e = min(s + CHUNK, n_bc)
                lo, hi = int(indptr[s]), int(indptr[e])
                idx = indices[lo:hi]
                if len(idx) and (idx.min() < 0 or idx.max() >= n_feat):
                    raise UserError(f"{path}: malformed Cell Ranger h5: feature index out of range in barcodes "
                                    f"{s}-{e - 1}; {fix}")
                x = sp.csr_matrix((data[lo:hi], idx, indptr[s:e + 1] - lo), shape=(e - s, n_feat))
                yield x if len(ge) == n_feat else x[:, ge]

        _write_matrix(out, "X", blocks(), (n_bc, len(ge)), np.float32, rows)
        _write_frames(out, pd.DataFrame(index=pd.Index(barcodes)), var)


# ------------------------------------------------------------------ mtx folder
def _read_tsv(path: Path, what: str, folder: Path) -> pd.DataFrame:
    try:
        t = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False, compression="infer")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"{folder}: {path.name} ({what}) is empty or not tab-separated text "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return t


def _convert_mtx(folder: Path, out: h5py.File, rows) -> None:
    found = {k: _first(folder, names) for k, names in MTX_FILES.items()}
    missing = [" or ".join(MTX_FILES[k]) for k, p in found.items() if p is None]
    if missing:
        raise UserError(f"{folder}: mtx folder has no {'; no '.join(missing)}; a Cell Ranger mtx folder holds "
                        "matrix.mtx(.gz), features.tsv(.gz) (or genes.tsv) and barcodes.tsv(.gz)")
    feats = _read_tsv(found["features"], "features", folder)
    barcodes = _read_tsv(found["barcodes"], "barcodes", folder)[0].to_numpy(dtype=object)
    import scipy.io
    try:
        x = scipy.io.mmread(str(found["matrix"]))
    except (ValueError, OSError, EOFError, IndexError, UnicodeDecodeError) as e:
        raise UserError(f"{folder}: {found['matrix'].name} is not a readable Matrix Market file "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); re-export the folder (Cell "
                        "Ranger, or scipy.io.mmwrite of the features x cells counts)") from None
    if not sp.issparse(x):
        x = sp.coo_matrix(x)
    if x.shape != (len(feats), len(barcodes)):
        raise UserError(f"{folder}: {found['matrix'].name} is {x.shape[0]} features x {x.shape[1]} barcodes, but "
                        f"{found['features'].name} has {len(feats)} rows and {found['barcodes'].name} {len(barcodes)}; "
                        "the three files must come from the same matrix")
    ids = feats[0].to_numpy(dtype=object)
    names = feats[1].to_numpy(dtype=object) if feats.shape[1] > 1 else ids
    types = feats[2].to_numpy(dtype=object) if feats.shape[1] > 2 else np.full(len(ids), GENE_EXPRESSION, object)
    ge = np.flatnonzero(types == GENE_EXPRESSION)
    if not len(ge):
        raise UserError(f"{folder}: no '{GENE_EXPRESSION}' features in {found['features'].name} (3rd column: "
                        f"{', '.join(sorted(set(types))[:5])}); UCE embeds gene expression")
    x = x.T.tocsr()  # cells x features; duplicate entries are summed
    if len(ge) < len(ids):
        x = x[:, ge]
    var = pd.DataFrame({"gene_ids": ids[ge], "feature_types": types[ge]}, index=pd.Index(names[ge]))
    n = x.shape[0]
    _write_matrix(out, "X", (x[s:s + CHUNK] for s in range(0, n, CHUNK)), x.shape, np.float32, rows)
    _write_frames(out, pd.DataFrame(index=pd.Index(barcodes)), var)


# ------------------------------------------------------------------ AnnData zarr
def _zarr_blocks(node, shape) -> Iterator[sp.csr_matrix]:
    import zarr
    if isinstance(node, zarr.Array):
        for s in range(0, shape[0], CHUNK):
            yield sp.csr_matrix(node[s:s + CHUNK])
        return
    enc = node.attrs.get("encoding-type")
    if enc == "csc_matrix":  # no cheap row access: read whole once, as H5Matrix does
        yield sp.csc_matrix((node["data"][:], node["indices"][:], node["indptr"][:]), shape=shape).tocsr()
        return
    indptr = node["indptr"][:].astype(np.int64)
    for s in range(0, shape[0], CHUNK):
        e = min(s + CHUNK, shape[0])
        lo, hi = int(indptr[s]), int(indptr[e])
        yield sp.csr_matrix((node["data"][lo:hi], node["indices"][lo:hi], indptr[s:e + 1] - lo), shape=(e - s, shape[1]))


def _zarr_matrix(path: Path, g, key: str, out: h5py.Group, out_key: str, rows) -> None:
    import zarr
    node = g[key]
    if isinstance(node, zarr.Array):
        shape, dtype = tuple(node.shape), node.dtype
    else:
        enc = node.attrs.get("encoding-type")
        if enc not in ("csr_matrix", "csc_matrix"):
            raise UserError(f"{path}: zarr matrix '{key}' has unsupported encoding '{enc}'; re-save it with a recent "
                            "anndata (sparse CSR or dense X)")
        shape, dtype = tuple(int(s) for s in node.attrs["shape"]), node["data"].dtype
    _write_matrix(out, out_key, _zarr_blocks(node, shape), shape, dtype, rows)


def _convert_zarr(path: Path, out: h5py.File, rows) -> None:
    from .preprocess import read_elem, write_elem
    try:
        import zarr
    except ImportError:
        raise UserError(f"{path}: reading AnnData zarr needs the zarr package (pip install 'zarr<3'), or convert it: "
                        "anndata.read_zarr('in.zarr').write_h5ad('out.h5ad')") from None
    if (path / "zarr.json").exists() and not (path / ".zgroup").exists():
        raise UserError(f"{path}: zarr format 3 store; this anndata reads zarr format 2: re-write it with "
                        "adata.write_zarr(path, zarr_format=2) or as h5ad (adata.write_h5ad)")
    try:
        g = zarr.open_group(str(path), mode="r")
        keys = set(g.keys())
        if not keys & {"X", "raw", "layers"} or "obs" not in keys or "var" not in keys:
            raise UserError(f"{path}: zarr store is not AnnData (needs obs, var and X, raw or layers; has "
                            f"{', '.join(sorted(keys)) or 'nothing'})")
        for key in ("X", "layers"):
            if key not in keys:
                continue
            if key == "X":
                _zarr_matrix(path, g, "X", out, "X", rows)
            else:
                lay = out.create_group("layers")
                lay.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
                for name in g["layers"].keys():
                    _zarr_matrix(path, g, f"layers/{name}", lay, name, rows)
        if "raw" in keys and "X" in g["raw"]:
            raw = out.create_group("raw")
            raw.attrs.update({"encoding-type": "raw", "encoding-version": "0.1.0"})
            _zarr_matrix(path, g, "raw/X", raw, "X", rows)
            write_elem(raw, "var", read_elem(g["raw/var"]))
        obsm = read_elem(g["obsm"]) if "obsm" in keys else {}
        _write_frames(out, read_elem(g["obs"]), read_elem(g["var"]), obsm)
    except UserError:
        raise
    except Exception as e:  # a damaged store: say which, in one line
        raise UserError(f"{path}: unreadable AnnData zarr store ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); re-write it with adata.write_zarr") from None
