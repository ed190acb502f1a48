"""The official UCE model files, read unchanged (uce-reference.md §3).

model_dir/
  species_chrom.csv            species, gene_symbol, chromosome, start
  species_offsets.pkl          species -> first token row of its gene block
  all_tokens.torch             token table [143574, 5120] (only its shape matters for the 8 species)
  protein_embeddings/*.pt      species -> {gene symbol: [5120] tensor}; only the keys are needed here
  4layer_model.torch, 33l_8ep_1024t_1280.torch   plain state_dicts, incl. pe_embedding.weight

Nothing here loads gigabytes it does not need: tensors are memory-mapped and only the rows of one
species are ever touched.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .io import UserError

# Official file names of the per-species protein embeddings (reference get_species_to_pe).
PROTEIN_EMBEDDING_FILES = {
    "human": "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt",
    "mouse": "Mus_musculus.GRCm39.gene_symbol_to_embedding_ESM2.pt",
    "frog": "Xenopus_tropicalis.Xenopus_tropicalis_v9.1.gene_symbol_to_embedding_ESM2.pt",
    "zebrafish": "Danio_rerio.GRCz11.gene_symbol_to_embedding_ESM2.pt",
    "mouse_lemur": "Microcebus_murinus.Mmur_3.0.gene_symbol_to_embedding_ESM2.pt",
    "pig": "Sus_scrofa.Sscrofa11.1.gene_symbol_to_embedding_ESM2.pt",
    "macaca_fascicularis": "Macaca_fascicularis.Macaca_fascicularis_6.0.gene_symbol_to_embedding_ESM2.pt",
    "macaca_mulatta": "Macaca_mulatta.Mmul_10.gene_symbol_to_embedding_ESM2.pt",
}
NEW_SPECIES_CSV = "new_species_protein_embeddings.csv"  # species,path: the reference's way to add species
OFFICIAL_TOKEN_ROWS = 143574  # all_tokens.torch rows; the reference then appends 1895 chromosome rows
OFFICIAL_TABLE_ROWS = 145469  # rows of pe_embedding in the official checkpoints
REFERENCE_CHROM_TOKEN_OFFSET = 143574  # the reference's --CHROM_TOKEN_OFFSET default (first chromosome row)
PAD, CHROM_OPEN, CHROM_CLOSE, CLS = 0, 1, 2, 3  # special token rows (CHROM_OPEN is never used)


@dataclass
class ModelFiles:
    """Where each model file is: `model_dir` in the official layout, with per-file overrides."""

    model_dir: Path | None = None
    model: str = "4layer_model.torch"
    spec_chrom_csv: Path | None = None
    offset_pkl: Path | None = None
    token_file: Path | None = None
    protein_embeddings_dir: Path | None = None
    # {species: file}: protein embeddings as the pipeline stages them (explicit files, no folder)
    protein_embedding_files: dict[str, Path] | None = None
    paths: dict = field(init=False)

    def __post_init__(self):
        base = Path(self.model_dir) if self.model_dir else None

        def pick(override, name, what):
            if override:
                return Path(override)
            if base is None and what == "protein-embeddings-dir":
                return None  # files given one by one instead (protein_embedding_files), or none: protein_embedding_file says so
            if base is None:
                raise UserError(f"--{what}: not given and no --model-dir; pass --model-dir DIR "
                                "(the official model_files layout) or the file itself")
            return base / name

        model = Path(self.model)
        ckpt = model if (model.is_absolute() or model.exists() or base is None) else base / model
        self.paths = {
            "spec_chrom_csv": pick(self.spec_chrom_csv, "species_chrom.csv", "spec-chrom-csv"),
            "offset_pkl": pick(self.offset_pkl, "species_offsets.pkl", "offset-pkl"),
            "token_file": pick(self.token_file, "all_tokens.torch", "token-file"),
            "protein_embeddings_dir": pick(self.protein_embeddings_dir, "protein_embeddings", "protein-embeddings-dir"),
            "model": ckpt,
        }

    def check(self, *names: str) -> None:
        """Fail early, naming the missing file and the fix."""
        for name in names or self.paths:
            p = self.paths[name]
            if p is not None and not p.exists():
                raise UserError(f"{p}: model file '{name}' not found; download the official files with "
                                "`uce download-model-files --dest DIR` (or --download_model_files in the "
                                f"pipeline), or pass --{name.replace('_', '-')}")

    def species_offsets(self) -> dict[str, int]:
        self.check("offset_pkl")
        with open(self.paths["offset_pkl"], "rb") as f:
            return {str(k): int(v) for k, v in pickle.load(f).items()}

    def protein_embedding_file(self, species: str) -> Path:
        if self.protein_embedding_files and species in self.protein_embedding_files:
            return Path(self.protein_embedding_files[species])
        d = self.paths["protein_embeddings_dir"]
        if d is None:
            raise UserError(f"species '{species}': no protein embeddings file found for it; pass --protein_embeddings_dir, "
                            f"or add the species in {NEW_SPECIES_CSV} of --model_dir")
        files = dict(PROTEIN_EMBEDDING_FILES)
        extra = d.parent / NEW_SPECIES_CSV if self.model_dir is None else Path(self.model_dir) / NEW_SPECIES_CSV
        if extra.exists():
            for row in pd.read_csv(extra).itertuples():
                files[str(row.species)] = str(row.path)
        if species not in files:
            raise UserError(f"species '{species}': no protein embeddings known; supported: "
                            f"{', '.join(sorted(files))} (add new species in {NEW_SPECIES_CSV})")
        p = Path(files[species])
        return p if p.is_absolute() else d / p

    def chrom_table(self) -> pd.DataFrame:
        """species_chrom.csv with the reference's global chromosome categories (§3.5)."""
        self.check("spec_chrom_csv")
        df = pd.read_csv(self.paths["spec_chrom_csv"], dtype={"chromosome": str, "gene_symbol": str, "species": str})
        missing = {"species", "gene_symbol", "chromosome", "start"} - set(df.columns)
        if missing:
            raise UserError(f"{self.paths['spec_chrom_csv']}: missing columns {sorted(missing)}; "
                            "expected species,gene_symbol,chromosome,start")
        df["spec_chrom"] = pd.Categorical(df["species"] + "_" + df["chromosome"])
        return df

    def token_table_shape(self) -> tuple[int, int]:
        """(rows, width) of the token file (memory-mapped: no values are read)."""
        self.check("token_file")
        table = _load(self.paths["token_file"])
        if not isinstance(table, torch.Tensor) or table.dim() != 2:
            raise UserError(f"{self.paths['token_file']}: not a token table (expected one 2-D tensor, "
                            "tokens x token_dim); download all_tokens.torch again")
        return int(table.shape[0]), int(table.shape[1])

    def checkpoint(self) -> dict[str, torch.Tensor]:
        self.check("model")
        return load_checkpoint(self.paths["model"])


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A UCE state dict, memory-mapped."""
    sd = _load(path)
    if not isinstance(sd, dict) or "encoder.0.weight" not in sd:
        raise UserError(f"{path}: not a UCE checkpoint (no 'encoder.0.weight' in the state dict)")
    return sd


def _load(path: Path):
    """torch.load, memory-mapped when the file is in the zip format (all official files are)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors: a truncated or foreign file
        raise UserError(f"{path}: cannot be read as a torch file ({type(e).__name__}: {e}); "
                        "download it again") from None


@dataclass
class ModelConfig:
    nlayers: int
    d_model: int
    nhead: int
    d_hid: int
    token_dim: int
    output_dim: int
    max_len: int

    @classmethod
    def from_state_dict(cls, sd: dict, nhead: int | None = None) -> "ModelConfig":
        layers = {int(k.split(".")[2]) for k in sd if k.startswith("transformer_encoder.layers.")}
        if not layers:
            raise UserError("checkpoint has no transformer_encoder.layers.*: not a UCE checkpoint")
        d_model, token_dim = sd["encoder.0.weight"].shape
        nhead = nhead or max(1, d_model // 64)
        if d_model % nhead:
            raise UserError(f"--nhead {nhead} does not divide d_model {d_model}")
        return cls(nlayers=max(layers) + 1, d_model=int(d_model), nhead=nhead,
                   d_hid=int(sd["transformer_encoder.layers.0.linear1.weight"].shape[0]),
                   token_dim=int(token_dim), output_dim=int(sd["decoder.3.weight"].shape[0]),
                   max_len=int(sd["pos_encoder.pe"].shape[0]))


def token_table(files: ModelFiles, sd: dict) -> torch.Tensor:
    """The token table the reference ends up using (§3.3): the checkpoint's own pe_embedding when the
    token file has the official row count, otherwise the token file verbatim (new-species files)."""
    rows = files.token_table_shape()[0]
    if rows in (OFFICIAL_TOKEN_ROWS, OFFICIAL_TABLE_ROWS) and sd["pe_embedding.weight"].shape[0] == OFFICIAL_TABLE_ROWS:
        return sd["pe_embedding.weight"]
    table = _load(files.paths["token_file"])
    if table.shape[1] != sd["encoder.0.weight"].shape[1]:
        raise UserError(f"{files.paths['token_file']}: token width {table.shape[1]} does not match the checkpoint's "
                        f"token_dim {sd['encoder.0.weight'].shape[1]}; use the token file that belongs to this model")
    return table


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def species_vocabulary(files: ModelFiles, species: str) -> list[str]:
    """Upper-cased gene symbols in the reference's order: first insertion wins the position (§3.3, §5)."""
    path = files.protein_embedding_file(species)
    if not path.exists():
        raise UserError(f"{path}: protein embeddings of '{species}' not found; download the official files "
                        "or pass --protein-embeddings-dir")
    keys = _load(path).keys()
    return list(dict.fromkeys(str(k).upper() for k in keys))


def species_file_pairs(pairs, option: str) -> dict[str, Path]:
    """SPECIES=PATH command-line pairs as {species: file}; one line for a malformed pair or a missing file."""
    out = {}
    for pair in pairs:
        species, sep, path = pair.partition("=")
        if not sep or not species or not path:
            raise UserError(f"{option} {pair}: expected SPECIES=PATH")
        if not Path(path).is_file():
            raise UserError(f"{option} {pair}: {path} not found")
        out[species] = Path(path)
    return out


def chrom_code_dtype(n_categories: int) -> np.dtype:
    """The integer type pandas gives Categorical codes; the reference argsorts codes of this type."""
    for dt in (np.int8, np.int16, np.int32):
        if n_categories < np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)
