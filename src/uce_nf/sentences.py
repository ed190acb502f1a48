"""Cell sentences (uce-reference.md §6): weighted gene draws grouped by chromosome.

A sentence is [CLS, (chrom token, genes of that chromosome by start, CHROM_CLOSE) * C], stored as
uint32 token ids; sentences of a shard are concatenated with an offsets array (CSR style).

Two samplers, both seeded:
- `reference` (compat): the reference's exact float32/float64 arithmetic and its single legacy MT19937
  stream, consumed in cell order (1024 draws by inverse CDF, then a shuffle of the chromosomes).
  Equal to the reference seeded once with `np.random.seed(seed)`. Sequential by nature.
- `none` (default): every cell draws from its own stream keyed by (seed, obs name), so its sentence
  does not depend on any other cell, on order or on sharding. Cells run in parallel processes.
Only the non-zero genes of a cell enter the CDF; this is exact, since zero-weight genes can never be
drawn (§10.4). No dense cells x genes array exists: one dense row at a time in compat mode.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from .io import H5Matrix, Progress, UserError, open_h5ad, save_npz, write_json
from .model_files import CHROM_CLOSE, CLS
from .preprocess_shards import cpu_seconds, ordered_map

log = logging.getLogger(__name__)
SAMPLE_SIZE = 1024
PAD_LENGTH = 1536


_LOG1P = torch.log1p(torch.arange(1 << 16, dtype=torch.int64)).numpy()  # float32, as torch computes it


def reference_weights(cols: np.ndarray, counts: np.ndarray, n_genes: int) -> np.ndarray:
    """The reference's sampling probabilities of the non-zero genes, bit for bit (§6.2-3):
    torch float32 log1p, divided by torch's float32 sum over the *dense* row (its reduction order
    depends on where the zeros are), then numpy-1.26's `w / sum(w)`, whose builtin sum accumulates
    sequentially in float64 and is rounded to float32 for the division. torch's log1p gives the same
    value wherever an element sits in a row (checked in tests), so it comes from a lookup table."""
    w = _LOG1P[counts] if counts.max(initial=0) < len(_LOG1P) else torch.log1p(torch.from_numpy(counts)).numpy()
    row = torch.zeros((1, n_genes), dtype=torch.float32)
    row[0, torch.from_numpy(cols)] = torch.from_numpy(w)
    w = w / torch.sum(row).numpy()  # float32 / float32: IEEE division, as torch does it
    s = np.cumsum(w, dtype=np.float64)[-1]
    return w / np.float32(s)


def _assemble(genes: np.ndarray, gene_chrom: np.ndarray, order: np.ndarray, index: dict) -> np.ndarray:
    """Write the sentence: CLS, then per chromosome in `order` its token, its genes, CHROM_CLOSE.
    `genes` are grouped by chromosome in ascending code order (gene_chrom sorted), each group already
    in its final order; `order` is a permutation of the distinct codes."""
    codes, first, counts = _groups(gene_chrom)
    rank = np.searchsorted(codes, order)  # ascending group index of each chromosome in output order
    span = np.empty(len(codes), dtype=np.int64)
    span[rank] = np.cumsum(counts[rank] + 2) - (counts[rank] + 2) + 1  # output start of each group
    out = np.empty(1 + len(genes) + 2 * len(codes), dtype=np.uint32)
    out[0] = CLS
    out[span] = int(index["chrom_token_offset"]) + codes.astype(np.int64)
    out[span + 1 + counts] = CHROM_CLOSE
    g = np.repeat(np.arange(len(codes)), counts)
    out[span[g] + 1 + np.arange(len(genes)) - first[g]] = index["token_id"][genes]
    return out


def _groups(sorted_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.unique(..., return_index=True, return_counts=True) for an already sorted array."""
    first = np.flatnonzero(np.concatenate(([True], sorted_codes[1:] != sorted_codes[:-1])))
    return sorted_codes[first], first, np.diff(np.append(first, len(sorted_codes)))


def prepare_index(index: dict) -> dict:
    """The index plus what the samplers precompute once: `ties` (tie_genes), `key` (chromosome,
    start as one int64) and the genes' global order by (chromosome, start, token): `order` lists the
    genes in that order and `rank` is each gene's position in it, so sorting a cell's draws is one
    integer sort (np.sort(rank[choice])) instead of a multi-key sort."""
    chrom, start = index["chrom"].astype(np.int64), index["start"]
    order = np.lexsort((index["token_id"], start, chrom))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return {**index, "ties": tie_genes(index), "key": chrom << 40 | start, "order": order, "rank": rank}


def _sorted_by_position(choice: np.ndarray, index: dict) -> np.ndarray:
    """The draws ordered by (chromosome, start, token); draws of equal key carry equal tokens."""
    if "rank" in index:
        return index["order"][np.sort(index["rank"][choice])]
    chrom = index["chrom"][choice].astype(np.int64)
    return choice[np.lexsort((index["token_id"][choice], index["start"][choice], chrom))]


def _distinct_tokens_tie(choice: np.ndarray, index: dict) -> bool:
    """Whether two *different* tokens were drawn at one (chromosome, start): only then can the order
    of the reference's unstable argsort show in the sentence."""
    t = index["ties"][choice]
    if not t.any():
        return False
    sel = choice[t]
    key = index["key"][sel] if "key" in index else index["chrom"][sel].astype(np.int64) << 40 | index["start"][sel]
    tok = index["token_id"][sel]
    o = np.lexsort((tok, key))
    key, tok = key[o], tok[o]
    return bool(np.any((key[1:] == key[:-1]) & (tok[1:] != tok[:-1])))


def tie_genes(index: dict) -> np.ndarray:
    """Genes sharing (chromosome, start) with a gene of another token: only for these can the order
    of numpy's unstable argsort show in a sentence."""
    key = index["chrom"].astype(np.int64) << 40 | index["start"]
    pairs = np.unique(np.stack([key, index["token_id"]]), axis=1)
    keys, n_tokens = np.unique(pairs[0], return_counts=True)
    return np.isin(key, keys[n_tokens > 1])


def reference_sentence(rs: np.random.RandomState, cols: np.ndarray, counts: np.ndarray, index: dict,
                       sample_size: int = SAMPLE_SIZE) -> np.ndarray:
    """One cell, consuming `rs` exactly as the reference consumes numpy's global stream."""
    p = reference_weights(cols, counts, len(index["chrom"])).astype(np.float64)
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    choice = cols[np.searchsorted(cdf, rs.random_sample(sample_size), side="right")]
    chrom, start = index["chrom"], index["start"]
    if index.get("ties") is not None and not _distinct_tokens_tie(choice, index):
        # No two different tokens drawn at one start: sorting by (chromosome, start) gives the same
        # tokens as the reference's per-chromosome argsorts, in one vectorised pass.
        genes = _sorted_by_position(choice, index)
        gene_chrom = chrom[genes]
        uq = _groups(gene_chrom)[0].copy()  # = np.unique(new_chrom)
        rs.shuffle(uq)
        return _assemble(genes, gene_chrom, uq, index)
    choice = choice[np.argsort(chrom[choice])]  # quicksort on pandas' code dtype, as the reference
    new_chrom = chrom[choice]
    chosen_starts = start[choice]
    uq = np.unique(new_chrom)
    rs.shuffle(uq)
    parts = {c: choice[loc[np.argsort(chosen_starts[loc])]] for c in uq for loc in [np.flatnonzero(new_chrom == c)]}
    genes = np.concatenate([parts[c] for c in sorted(parts)])
    return _assemble(genes, chrom[genes], uq, index)


def cell_rng(seed: int, obs_name: str) -> np.random.Generator:
    """A stream that belongs to one cell: keyed by the seed and the cell's name, nothing else."""
    digest = hashlib.blake2b(str(obs_name).encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, *np.frombuffer(digest, np.uint32)])))


def context_free_sentence(rng: np.random.Generator, cols: np.ndarray, counts: np.ndarray, index: dict,
                          sample_size: int = SAMPLE_SIZE) -> np.ndarray:
    """One cell from its own stream: log1p weights in float64, chromosomes in random order, genes by
    (start, token) with a stable sort so ties never depend on the platform's sort."""
    cdf = np.cumsum(np.log1p(counts.astype(np.float64)))
    choice = cols[np.searchsorted(cdf, rng.random(sample_size) * cdf[-1], side="right")]
    genes = _sorted_by_position(choice, index)
    gene_chrom = index["chrom"][genes]
    return _assemble(genes, gene_chrom, rng.permutation(_groups(gene_chrom)[0]), index)


def _truncated_counts(m: sp.csr_matrix) -> sp.csr_matrix:
    """The reference sees counts as float32 cast to int64 (§4.7); zeros that appear are dropped."""
    m = m.copy()
    m.data = m.data.astype(np.float32).astype(np.int64)
    m.eliminate_zeros()
    return m


def _context_free_chunk(args) -> list[np.ndarray]:
    m, names, index, seed, sample_size = args
    return [context_free_sentence(cell_rng(seed, n), m.indices[m.indptr[i]:m.indptr[i + 1]],
                                  m.data[m.indptr[i]:m.indptr[i + 1]], index, sample_size)
            for i, n in enumerate(names)]


def shard_bounds(n_cells: int, shard_size: int, batch_size: int, compat: bool) -> list[tuple[int, int]]:
    """Cell ranges of the shards. In compat mode they fall on multiples of batch_size so every forward
    batch of a sharded run is a batch of the unsharded run."""
    if compat:
        if batch_size < 1:  # the batch defines compat results; 0 ("auto") is for the default mode
            raise UserError("--batch-size 0 (auto) works only with --compat none; pass the reference's batch "
                            "size, e.g. 25")
        shard_size = max(batch_size, (shard_size // batch_size) * batch_size)
    return [(s, min(s + shard_size, n_cells)) for s in range(0, n_cells, shard_size)]


def write_sentences(adata_path: Path, index: dict, out_dir: Path, name: str, *, seed: int = 0,
                    compat: bool = False, batch_size: int = 25, shard_size: int = 100_000,
                    workers: int = 1, sample_size: int = SAMPLE_SIZE, pad_length: int = PAD_LENGTH,
                    chunk: int = 4096) -> list[Path]:
    """Stream the processed counts in row chunks and write one sentences file per shard, plus
    <name>.shards.json ({shard file name: cells}): the pipeline packs small datasets' shards into
    shared EMBED tasks by these counts without opening the shards."""
    t0 = time.time()
    out_dir = Path(out_dir)
    rs = np.random.RandomState(seed) if compat else None
    index = prepare_index(index)
    paths = []
    with open_h5ad(adata_path) as f:
        X = H5Matrix(f["X"])
        names = _obs_names(f)
        bounds = shard_bounds(X.shape[0], shard_size, batch_size, compat)
        # Default mode with workers: each worker reads its own rows from the file and returns its cells'
        # sentences, so the parent only gathers and writes (no counts pass through it).
        pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                    initargs=(str(adata_path), index, seed, sample_size))
                if (workers > 1 and not compat) else None)
        progress = Progress(X.shape[0], "sentences")
        try:
            for k, (lo, hi) in enumerate(bounds):
                tokens, lengths = [], []  # per row block: concatenated sentences, their lengths
                if pool:
                    jobs = [(a, min(a + chunk, hi), names[a:min(a + chunk, hi)]) for a in range(lo, hi, chunk)]
                    for t, n in ordered_map(pool, _worker_rows, jobs, 2 * workers):
                        tokens.append(t)
                        lengths.append(n)
                        progress.update(len(n))
                for start in range(lo, hi, chunk) if not pool else ():
                    m = _truncated_counts(X.rows(start, min(start + chunk, hi)))
                    if compat:
                        out = [reference_sentence(rs, m.indices[m.indptr[i]:m.indptr[i + 1]],
                                                  m.data[m.indptr[i]:m.indptr[i + 1]], index, sample_size)
                               for i in range(m.shape[0])]
                    else:
                        out = _context_free_chunk((m, names[start:start + m.shape[0]], index, seed, sample_size))
                    tokens.append(np.concatenate(out))
                    lengths.append(np.array([len(x) for x in out], dtype=np.int64))
                    progress.update(m.shape[0])
                lengths = np.concatenate(lengths)
                if lengths.max() > pad_length:
                    raise ValueError(f"a sentence has {lengths.max()} tokens > pad_length {pad_length}: the cell "
                                     "spans too many chromosomes/scaffolds")
                path = out_dir / f"{name}.shard-{k:05d}.sentences.npz"
                save_npz(path, tokens=np.concatenate(tokens), offsets=np.concatenate([[0], np.cumsum(lengths)]),
                         cell_index=np.arange(lo, hi, dtype=np.int64))
                paths.append(path)
                log.info("shard %d/%d: cells %d-%d written (%.0f cells/s)", k + 1, len(bounds), lo, hi - 1,
                         hi / max(time.time() - t0, 1e-9))
        finally:
            progress.close()
            if pool:
                pool.shutdown()
    write_json(out_dir / f"{name}.shards.json", {p.name: hi - lo for p, (lo, hi) in zip(paths, bounds)})
    log.info("sentences: %d cells in %.1f s; CPU s: main process %.1f, workers %.1f", X.shape[0], time.time() - t0,
             *cpu_seconds())
    return paths


_WORKER: dict = {}


def _init_worker(adata_path: str, index: dict, seed: int, sample_size: int) -> None:
    """A spawned worker keeps the index and an open handle on the processed file for all its jobs."""
    _WORKER.update(X=H5Matrix(open_h5ad(adata_path)["X"]), index=index, seed=seed, sample_size=sample_size)


def _worker_rows(lo: int, hi: int, names) -> tuple[np.ndarray, np.ndarray]:
    """Sentences of rows [lo, hi), as concatenated tokens and lengths (one array each to send back)."""
    m = _truncated_counts(_WORKER["X"].rows(lo, hi))
    out = _context_free_chunk((m, names, _WORKER["index"], _WORKER["seed"], _WORKER["sample_size"]))
    return np.concatenate(out), np.array([len(x) for x in out], dtype=np.int64)


def _obs_names(f) -> np.ndarray:
    obs = f["obs"]
    key = obs.attrs.get("_index", "_index")
    key = key.decode() if isinstance(key, bytes) else key
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in obs[key][:]], dtype=object)


def load_sentences(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
