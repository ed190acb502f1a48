"""`uce`: one click command per pipeline step, plus `uce run` that chains them in one process.

Every step reads and writes files (docs/design.md), so each can run in its own Nextflow task.
User errors print one line (what, where, how to fix) and exit with status 2.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import click

from . import __version__
from .io import UserError, handle_errors, write_json

log = logging.getLogger("uce_nf")
CTX = {"show_default": True, "help_option_names": ["-h", "--help"]}
PathIn = click.Path(exists=True, dir_okay=False, path_type=Path)
PathOut = click.Path(dir_okay=False, path_type=Path)
# a dataset: an .h5ad or Cell Ranger .h5 file, or an AnnData .zarr / Cell Ranger mtx folder (formats.py)
PathDataset = click.Path(exists=True, path_type=Path)


def model_file_options(fn):
    for opt in reversed([
        click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path), help="Folder in the official model_files layout."),
        click.option("--model", default="4layer_model.torch", help="Checkpoint: a file name in --model-dir, or a path."),
        click.option("--spec-chrom-csv", type=PathIn, help="Override species_chrom.csv."),
        click.option("--offset-pkl", type=PathIn, help="Override species_offsets.pkl."),
        click.option("--token-file", type=PathIn, help="Override all_tokens.torch."),
        click.option("--protein-embeddings-dir", type=click.Path(file_okay=False, path_type=Path), help="Override protein_embeddings/."),
        click.option("--nhead", type=int, default=None, help="Attention heads (default d_model/64)."),
    ]):
        fn = opt(fn)
    return fn


def _files(o, protein_embedding_files=None):
    from .model_files import ModelFiles
    return ModelFiles(o["model_dir"], o["model"], o["spec_chrom_csv"], o["offset_pkl"], o["token_file"],
                      o["protein_embeddings_dir"], protein_embedding_files)


@click.group(context_settings=CTX)
@click.version_option(__version__, prog_name="uce")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose):
    """Universal Cell Embeddings: faithful, seeded and fast. Steps of the uce-nf pipeline."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


CHROM_OFFSET_HELP = ("First token-table row of the chromosome tokens (the reference's CHROM_TOKEN_OFFSET). Default: "
                     "143574 with the checkpoint's own table; required for a replaced token file unless its layout "
                     "proves it.")


@main.command("species-vocab", context_settings=CTX)
@click.option("--species", required=True, help="Species name, a key of species_offsets.pkl (e.g. human).")
@model_file_options
@click.option("--protein-embedding", type=PathIn, default=None,
              help="This species' protein embeddings (.pt), instead of looking it up in --protein-embeddings-dir.")
@click.option("--other-protein-embedding", "other_protein_embeddings", multiple=True, metavar="SPECIES=PATH",
              help="Another species' protein embeddings (repeatable). Only their sizes are read, and only for a "
                   "replaced token file: with every species of species_offsets.pkl they prove where the gene "
                   "blocks end, so the chromosome token offset can be inferred.")
@click.option("--chrom-token-offset", type=click.IntRange(0), default=None, help=CHROM_OFFSET_HELP)
@click.option("--source", help="Where a new species' files came from (the pipeline: its species sheet row), for the report.")
@click.option("--taxonomy-id", type=click.IntRange(1), help="NCBI taxonomy id of a new species, for the report.")
@click.option("--record-errors", is_flag=True,
              help="On a problem with the model files write it into the output (exit 0): the pipeline's VALIDATE "
                   "reports it for every dataset of the species.")
@click.option("--output", type=PathOut, required=True, help="Vocabulary file to write (.vocab.pt).")
@handle_errors
def species_vocab_cmd(species, protein_embedding, other_protein_embeddings, chrom_token_offset, source, taxonomy_id,
                      record_errors, output, **o):
    """The model-independent half of a species file: symbols, token ids, chromosomes, starts. Reads no checkpoint."""
    from .model_files import species_file_pairs
    from .species import save_species, species_vocab, vocab_error
    try:
        pe = species_file_pairs(other_protein_embeddings, "--other-protein-embedding")
        if protein_embedding:
            pe[species] = protein_embedding
        obj = species_vocab(_files(o, pe or None), species, chrom_token_offset, source, taxonomy_id)
    except UserError as e:
        if not record_errors:
            raise
        log.error("%s", e)
        obj = vocab_error(species, str(e))
    save_species(obj, output)
    log.info("wrote %s", output)


@main.command("prepare-species", context_settings=CTX)
@click.option("--species", required=True, help="Species name, a key of species_offsets.pkl (e.g. human).")
@model_file_options
@click.option("--vocab", "vocab_path", type=PathIn, default=None,
              help="From `uce species-vocab`: project it with --model (a path) alone; no other model file is read.")
@click.option("--chrom-token-offset", type=click.IntRange(0), default=None, help=CHROM_OFFSET_HELP)
@click.option("--output", type=PathOut, required=True, help="Species file to write (.species.pt).")
@handle_errors
def prepare_species_cmd(species, output, chrom_token_offset, vocab_path=None, **o):
    """Vocabulary and projected token table of one species for one checkpoint, with the weights EMBED needs."""
    from .species import load_vocab, prepare_species, project_species, save_species
    if vocab_path is None:
        save_species(prepare_species(_files(o), species, o["nhead"], chrom_token_offset), output)
    else:
        vocab = load_vocab(vocab_path)
        if vocab["species"] != species:
            raise UserError(f"{vocab_path}: the vocabulary of '{vocab['species']}', not '{species}'")
        from .model_files import load_checkpoint
        ckpt = Path(o["model"]) if o["model_dir"] is None else Path(o["model_dir"]) / o["model"]
        if not ckpt.is_file():
            raise UserError(f"{ckpt}: checkpoint not found; pass --model PATH")
        save_species(project_species(vocab, load_checkpoint(ckpt), ckpt, o["nhead"]), output)
    log.info("wrote %s", output)


def filter_options(fn):
    for opt in reversed([
        click.option("--filter/--no-filter", "filter_", default=True, help="Apply the reference's min_cells/min_genes filter."),
        click.option("--min-cells", type=click.IntRange(0), default=10, help="Keep genes expressed in at least this many cells."),
        click.option("--min-genes", type=click.IntRange(0), default=25, help="Then keep cells expressing at least this many genes."),
        click.option("--gene-column", default=None, help="var column with gene symbols (auto: var_names, or feature_name/gene_symbols/gene_name for Ensembl ids)."),
        click.option("--counts-layer", default=None, help="Where raw counts are: X, raw or a layer name (auto-detected if unset)."),
    ]):
        fn = opt(fn)
    return fn


@main.command("preprocess", context_settings=CTX)
@click.option("--input", "input_", type=PathDataset, required=True,
              help="Input dataset (read only): .h5ad, AnnData .zarr, Cell Ranger .h5 or mtx folder.")
@click.option("--species-file", type=PathIn, required=True, help="From `uce species-vocab` (or `uce prepare-species`).")
@filter_options
@click.option("--output", type=PathOut, required=True, help="Processed h5ad to write.")
@click.option("--stats", type=PathOut, required=True, help="JSON with cells/genes in, kept and dropped.")
@click.option("--workers", type=click.IntRange(1), default=1,
              help="Processes over row ranges (.h5ad input); the output does not depend on it.")
@handle_errors
def preprocess_cmd(input_, species_file, filter_, min_cells, min_genes, gene_column, counts_layer, output, stats,
                   workers):
    """Filter cells and genes as the reference does, on sparse chunks; keep genes with embeddings."""
    from .preprocess import FilterSettings, preprocess
    from .species import load_vocab
    sf = load_vocab(species_file)
    st = preprocess(input_, sf, FilterSettings(filter_, min_cells, min_genes), output, gene_column=gene_column,
                    counts_layer=counts_layer, workers=workers)
    st["species"] = sf["species"]
    write_json(stats, st)
    log.info("kept %d of %d cells and %d of %d genes", st["cells_kept"], st["cells_in"], st["genes_kept"], st["genes_in"])


@main.command("index", context_settings=CTX)
@click.option("--adata", type=PathIn, required=True, help="Processed h5ad.")
@click.option("--species-file", type=PathIn, required=True, help="From `uce species-vocab` (or `uce prepare-species`).")
@click.option("--output", type=PathOut, required=True, help="Index file (.index.npz).")
@handle_errors
def index_cmd(adata, species_file, output):
    """Token id, chromosome code and start of every processed gene."""
    import anndata as ad
    from .species import load_vocab
    from .tokens import index_genes, save_index
    save_index(index_genes(ad.read_h5ad(adata, backed="r").var_names, load_vocab(species_file)), output)


REFERENCE_BATCH_SIZE = 25  # eval_single_anndata's --batch_size default
SEED_RANGE = click.IntRange(0, 2**32 - 1)  # numpy's RandomState range; the pipeline schema's too
AUTO_BATCH_COMPAT = ("--batch-size 0 (auto) works only with --compat none; pass the reference's batch size, "
                     "e.g. 25")


def sampling_options(fn):
    import functools

    @functools.wraps(fn)
    def checked(*a, **k):
        # In compat mode the batch defines the result, so "auto" cannot be honoured; checked before
        # any work (SENTENCES would otherwise divide by it).
        if k.get("compat") == "reference" and k.get("batch_size") == 0:
            click.echo(f"ERROR: {AUTO_BATCH_COMPAT}", err=True)
            sys.exit(2)
        if k.get("batch_size") is None and k.get("compat") == "reference":
            k["batch_size"] = REFERENCE_BATCH_SIZE
        return fn(*a, **k)

    for opt in reversed([
        click.option("--seed", type=SEED_RANGE, default=0, help="Random seed (the reference itself is unseeded)."),
        click.option("--compat", type=click.Choice(["none", "reference"]), default="none",
                     help="reference: reproduce uce-model bit for bit (seeded); none: context-free, batch-invariant."),
        click.option("--batch-size", type=click.IntRange(0), default=None,
                     help="Cells per forward batch. Default: the reference's 25 in compat mode; in default mode "
                          "batches fill a token budget sized from free GPU memory (0 means the same), and N caps them."),
    ]):
        checked = opt(checked)
    return checked


@main.command("sentences", context_settings=CTX)
@click.option("--adata", type=PathIn, required=True, help="Processed h5ad.")
@click.option("--index", "index_path", type=PathIn, required=True, help="From `uce index`.")
@sampling_options
@click.option("--shard-size", type=click.IntRange(1), default=100_000, help="Cells per shard (one EMBED task each).")
@click.option("--workers", type=click.IntRange(1), default=None, help="Processes for the default sampler (default: all CPUs).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--name", required=True, help="Dataset name used in the shard file names.")
@handle_errors
def sentences_cmd(adata, index_path, seed, compat, batch_size, shard_size, workers, output_dir, name):
    """Sample cell sentences into shard files."""
    from .sentences import default_workers, write_sentences
    from .tokens import load_index
    paths = write_sentences(adata, load_index(index_path), output_dir, name, seed=seed, compat=compat == "reference",
                            batch_size=batch_size, shard_size=shard_size, workers=workers or default_workers())
    log.info("wrote %d shard(s) to %s", len(paths), output_dir)


@main.command("embed", context_settings=CTX)
@click.option("--sentences", "sentences_paths", type=PathIn, multiple=True, required=True,
              help="A shard from `uce sentences`; repeat for several (the model is loaded once, each shard "
                   "embedded as if alone).")
@click.option("--species-file", type=PathIn, required=True)
@model_file_options
@sampling_options
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", help="auto: bf16 on GPU, fp32 on CPU and in compat mode.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="auto: CUDA when usable, else CPU (logged); cuda: a GPU or a one-line error.")
@click.option("--gpu-lock-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder shared by the node's EMBED tasks, where each claims one free GPU "
                   "(default: $UCE_NF_GPU_LOCK_DIR or /tmp/uce-nf-gpu-locks).")
@click.option("--gpu-wait", type=click.IntRange(0), default=24 * 3600,
              help="Seconds to wait for a free GPU when every GPU of the node is claimed.")
@click.option("--compile/--no-compile", "compile_", default=False, help="torch.compile the model.")
@click.option("--output", "outputs", type=PathOut, multiple=True, required=True,
              help="Embeddings file (.embeddings.npz), one per --sentences, in the same order.")
@handle_errors
def embed_cmd(sentences_paths, species_file, seed, compat, batch_size, precision, device, compile_, outputs,
              gpu_lock_dir=None, gpu_wait=0, **o):
    """Run the model over shards. The species file carries the weights EMBED needs (no token table);
    with --model-dir or a --model path the checkpoint is used instead, and must be the species file's."""
    if len(sentences_paths) != len(outputs):
        raise UserError(f"{len(sentences_paths)} --sentences but {len(outputs)} --output: pass one --output per "
                        "--sentences, in the same order")
    from .devices import claim_device
    from .embed import EmbedSettings, Embedder
    from .species import check_species_file_checkpoint, load_species
    sf = load_species(species_file)
    if o["model_dir"] is not None or Path(o["model"]).is_file():
        files = _files(o)
        check_species_file_checkpoint(sf, species_file, files.paths["model"])
        sd = files.checkpoint()
    elif "weights" in sf:
        sd = sf["weights"]
    else:
        raise UserError(f"{species_file}: holds no model weights (made by an older uce-nf); re-run prepare-species, "
                        "or pass --model-dir with its checkpoint")
    if device != "cpu":
        claim_device(gpu_lock_dir, wait_s=gpu_wait)  # one free GPU of this node; before torch touches CUDA
    emb = Embedder(sd, sf, EmbedSettings(compat == "reference", batch_size, precision, device, compile_), o["nhead"])
    emb.embed_files(sentences_paths, outputs)


OUTPUT_MODES = ("full", "embeddings")


def output_mode_option(fn):
    return click.option("--output-mode", type=click.Choice(OUTPUT_MODES), default="full",
                        help="full: the processed AnnData (filtered cells, counts) + obsm['X_uce'], the reference's "
                             "file; embeddings: every input cell in input order with the input's obs, X_uce (NaN for "
                             "cells the filters dropped) and obs['uce_embedded'], no counts, plus <output>.parquet.")(fn)


@main.command("merge", context_settings=CTX)
@click.option("--adata", type=PathIn, required=True, help="Processed h5ad.")
@click.option("--embeddings", type=PathIn, multiple=True, required=True, help="Every shard's embeddings file.")
@click.option("--stats", type=PathIn, required=True, help="Preprocess stats JSON.")
@click.option("--species-file", type=PathIn, required=True)
@sampling_options
@output_mode_option
@click.option("--input", "input_", type=PathDataset, default=None,
              help="The h5ad PREPROCESS read (read only, its obs alone); needed by --output-mode embeddings.")
@click.option("--output", type=PathOut, required=True,
              help="Result h5ad (<name>_uce_adata.h5ad; <name>_uce.h5ad in embeddings mode, .parquet beside it).")
@click.option("--summary", type=PathOut, default=None,
              help="Also write the small summary `uce report --summary` reads (<name>.summary.json + .npz): "
                   "embedding QC numbers, the report map's sampled cells and the species file's vocabulary, offset "
                   "and checkpoint, so REPORT need not stage the h5ad or the species file.")
@handle_errors
def merge_cmd(adata, embeddings, stats, species_file, seed, compat, batch_size, output_mode, input_, output,
              summary=None):
    """Write the result: obsm['X_uce'] streamed shard by shard, obs['uce_input_row'/'uce_input_name'], uns['uce']."""
    import json
    from .io import UserError
    from .output import open_shards, write_merged
    from .species import load_species
    if output_mode == "embeddings" and input_ is None:
        raise UserError("--output-mode embeddings needs --input, the h5ad that PREPROCESS read (for its obs)")
    shards = open_shards(embeddings)  # small arrays only; the rows are streamed while writing
    st = json.loads(Path(stats).read_text())
    sf = load_species(species_file)
    prov = provenance(sf, st, seed, compat, batch_size, [s.meta for s in shards], output_mode)
    res = write_merged(adata, shards, prov, output, mode=output_mode, input_h5ad=input_,
                       renamed=int(st.get("duplicate_obs_names", 0)) > 0, expect_cells=st.get("cells_kept"))
    log.info("wrote %s (%d cells, %d embedded)", ", ".join(map(str, res["files"])), res["cells"], res["embedded"])
    if summary is not None:
        from .report_species import species_block
        from .report_summary import write_summary  # the report's defaults: seed 0, 20,000 map cells
        write_summary(Path(output), Path(summary), species=species_block(sf))  # + the species file's scalars
        log.info("wrote %s (+ .npz)", summary)


def provenance(sf: dict, st: dict, seed, compat, batch_size, shards, output_mode: str = "full") -> dict:
    """uns['uce']; `shards`: each shard's small entries (precision, device, seconds, ...)."""
    return {"version": __version__, "species": sf["species"], "model_file": sf["model"]["file"],
            "model_sha256": sf["model"]["sha256"], "nlayers": int(sf["model"]["config"]["nlayers"]),
            "compat": compat, "seed": int(seed), "batch_size": int(batch_size or 0),
            "batching": "consecutive cells" if compat == "reference" else "equal-length sentences, token budget",
            "precision": str(shards[0]["precision"]), "device": str(shards[0]["device"]),
            "n_shards": len(shards), "embed_seconds": float(sum(float(s["seconds"]) for s in shards)),
            "gpu_names": sorted({str(s["gpu_name"]) for s in shards if "gpu_name" in s}),
            "gpu_devices": sorted({str(s["gpu_visible_as"]) for s in shards if "gpu_visible_as" in s}),
            "oom_splits": int(sum(int(s.get("oom_splits", 0)) for s in shards)),
            "output_mode": output_mode, "preprocess": st}


@main.command("run", context_settings=CTX)
@click.option("--input", "input_", type=PathDataset, required=True,
              help="Input dataset (read only): .h5ad, AnnData .zarr, Cell Ranger .h5 or mtx folder.")
@click.option("--species", default="human")
@model_file_options
@click.option("--chrom-token-offset", type=click.IntRange(0), default=None,
              help="The reference's CHROM_TOKEN_OFFSET (see `uce prepare-species --help`).")
@filter_options
@sampling_options
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--workers", type=click.IntRange(1), default=None)
@output_mode_option
@click.option("--output", type=PathOut, required=True,
              help="Result h5ad (<name>_uce_adata.h5ad; <name>_uce.h5ad in embeddings mode, .parquet beside it).")
@click.pass_context
def run_cmd(ctx, input_, species, output, **o):
    """All steps in one process, for users without Nextflow."""
    if o["device"] == "cuda":  # a missing GPU is found before any heavy step
        from .devices import claim_device, cuda_problem
        claim_device()
        if problem := cuda_problem():
            click.echo(f"ERROR: --device cuda: {problem}", err=True)
            sys.exit(2)
    with tempfile.TemporaryDirectory(prefix="uce-run-", dir=output.parent if output.parent.exists() else None) as d:
        d = Path(d)
        name = input_.name.removesuffix(".h5ad")
        sf, proc, stats, idx = d / f"{species}.species.pt", d / f"{name}_proc.h5ad", d / f"{name}.preprocess.json", d / f"{name}.index.npz"
        common = {k: o[k] for k in ("model_dir", "model", "spec_chrom_csv", "offset_pkl", "token_file", "protein_embeddings_dir", "nhead")}
        samp = {k: o[k] for k in ("seed", "compat", "batch_size")}
        ctx.invoke(prepare_species_cmd, species=species, output=sf, chrom_token_offset=o["chrom_token_offset"], **common)
        ctx.invoke(preprocess_cmd, input_=input_, species_file=sf, output=proc, stats=stats, workers=o["workers"] or 1,
                   **{k: o[k] for k in ("filter_", "min_cells", "min_genes", "gene_column", "counts_layer")})
        ctx.invoke(index_cmd, adata=proc, species_file=sf, output=idx)
        ctx.invoke(sentences_cmd, adata=proc, index_path=idx, shard_size=10**12, workers=o["workers"],
                   output_dir=d, name=name, **samp)
        shard = d / f"{name}.shard-00000.sentences.npz"
        emb = d / f"{name}.shard-00000.embeddings.npz"
        ctx.invoke(embed_cmd, sentences_paths=(shard,), species_file=sf, precision=o["precision"], device=o["device"],
                   compile_=False, outputs=(emb,), **common, **samp)
        ctx.invoke(merge_cmd, adata=proc, embeddings=(emb,), stats=stats, species_file=sf, output=output,
                   output_mode=o["output_mode"], input_=input_, **samp)


def _register_optional():
    """Commands that live in their own modules (demo data, downloads, validation, report)."""
    import importlib
    for module, attr, name in [("demo", "make_demo_command", "make-demo"),
                               ("download", "download_model_files_command", "download-model-files"),
                               ("validate", "validate_command", "validate"),
                               *[("newspecies", f"{n.replace('-', '_')}_command", n) for n in ("proteome", "esm-embed", "gene-embeddings", "species-files")],
                               ("report", "report_command", "report"), ("atlas", "atlas_command", "atlas")]:
        try:
            cmd = getattr(importlib.import_module(f"uce_nf.{module}"), attr)
        except ModuleNotFoundError as e:  # a module not written yet; a broken one still fails loudly
            if e.name != f"uce_nf.{module}":
                raise
            continue
        main.add_command(cmd, name)


_register_optional()

if __name__ == "__main__":
    main()
