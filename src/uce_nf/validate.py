"""Cheap checks of one dataset and the model files, run before any heavy task.

Everything here reads metadata or a few rows only: the h5ad opens, raw counts are found, gene
symbols are found and match the species, the species exists in the model files, and the checkpoint
fits the token file. Each problem is one line: what, where, how to fix.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from .io import H5Matrix, UserError, open_h5ad, write_json
from .model_files import ModelFiles
from .preprocess import FilterSettings

try:
    from anndata.io import read_elem
except ImportError:  # pragma: no cover
    from anndata.experimental import read_elem

log = logging.getLogger(__name__)
SAMPLE_ROWS = 2000  # cells whose values find_counts checks here (PREPROCESS checks every cell)


def validate_model_files(files: ModelFiles, species: str, nhead: int | None = None,
                         chrom_token_offset: int | None = None) -> tuple[dict, list[str]]:
    """The model-file checks of one species (`uce validate --model-dir`); also returns its vocabulary."""
    from .species import check_checkpoint, species_vocab
    files.check()
    vocab = species_vocab(files, species, chrom_token_offset)  # impossible offsets: one line, now
    cfg = check_checkpoint(vocab, files.checkpoint(), files.paths["model"], nhead)
    return {"model": files.paths["model"].name, "config": cfg.__dict__, **vocab_summary(vocab)}, vocab["symbols"]


def vocab_summary(vocab: dict) -> dict:
    return {"token_rows": vocab["table"]["rows"], "chrom_token_offset": vocab["chrom_token_offset"]} if "table" in vocab \
        else {"chrom_token_offset": vocab["chrom_token_offset"]}


def validate_dataset(path: Path, species_symbols: list[str], gene_column: str | None, counts_layer: str | None,
                     min_matched_genes: int = 100, settings: FilterSettings | None = None) -> dict:
    """Metadata-only checks. With the filter settings it also catches files the filter would empty
    (fewer cells than min_cells, fewer genes than min_genes), which PREPROCESS would otherwise
    report as a gene-matching problem after reading every row."""
    from .preprocess import filter_fix, find_counts, gene_symbols, too_few_cells
    settings = settings or FilterSettings()
    # other formats are converted for the first SAMPLE_ROWS cells only: all that is read here
    with open_h5ad(path, rows=SAMPLE_ROWS) as f:
        x_key, var_key = find_counts(f, path, counts_layer, sample_rows=SAMPLE_ROWS)
        shape = H5Matrix(f[x_key]).shape
        symbols, source = gene_symbols(read_elem(f[var_key]), path, gene_column)
    if shape[0] == 0 or shape[1] == 0:
        raise UserError(f"{path}: {x_key} is empty ({shape[0]} cells x {shape[1]} genes); nothing to embed: "
                        "check the export, or remove the row from the samplesheet")
    vocab = {s.lower() for s in species_symbols}
    matched = sum(str(s).lower() in vocab for s in symbols)
    if matched < min_matched_genes:
        raise UserError(f"{path}: only {matched} of {len(symbols)} genes match the species' gene symbols "
                        f"(need >= {min_matched_genes}); check the species column, or set gene_column to the var "
                        "column that holds gene symbols")
    if settings.filter and shape[0] < settings.min_cells:
        raise UserError(too_few_cells(path, shape[0], settings.min_cells))
    if settings.filter and shape[1] < settings.min_genes:
        raise UserError(f"{path}: {shape[1]} genes but min_genes={settings.min_genes}: the cell filter keeps cells "
                        f"expressing >= min_genes genes, so it removes every cell; "
                        f"{filter_fix('min_genes', f' to at most {shape[1]}')}")
    return {"cells": shape[0], "genes": shape[1], "genes_matched": matched, "counts_source": x_key,
            "gene_symbols_from": source}


@click.command("validate", context_settings={"show_default": True})
@click.option("--input", "input_", type=click.Path(path_type=Path), required=True,
              help="Dataset: .h5ad, AnnData .zarr, Cell Ranger .h5 or mtx folder (detected by content).")
@click.option("--species", required=True)
@click.option("--gene-column", default=None)
@click.option("--counts-layer", default=None)
@click.option("--species-vocab", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="From `uce species-vocab` (the pipeline's way): the model files are not read.")
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", default="4layer_model.torch")
@click.option("--spec-chrom-csv", type=click.Path(path_type=Path))
@click.option("--offset-pkl", type=click.Path(path_type=Path))
@click.option("--token-file", type=click.Path(path_type=Path))
@click.option("--protein-embeddings-dir", type=click.Path(path_type=Path))
@click.option("--min-matched-genes", type=click.IntRange(1), default=100)
@click.option("--chrom-token-offset", type=click.IntRange(0), default=None,
              help="As `uce prepare-species`: checked here, before any heavy step.")
@click.option("--filter/--no-filter", "filter_", default=True, help="The filter PREPROCESS will apply (as `uce preprocess`).")
@click.option("--min-cells", type=click.IntRange(0), default=10)
@click.option("--min-genes", type=click.IntRange(0), default=25)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="JSON summary; on a problem with the inputs {\"error\": <one line>} (and exit status 2).")
def validate_command(input_, species, gene_column, counts_layer, species_vocab, model_dir, model, spec_chrom_csv, offset_pkl,
                     token_file, protein_embeddings_dir, min_matched_genes, chrom_token_offset, filter_, min_cells,
                     min_genes, output):
    """Check one dataset and the model files in seconds, before any heavy work."""
    import sys
    try:
        if species_vocab is not None:
            from .species import load_vocab
            vocab = load_vocab(species_vocab)  # a problem the vocabulary step recorded is raised here
            model_summary, symbols = {"species_vocab": species_vocab.name, **vocab_summary(vocab)}, vocab["symbols"]
        else:
            files = ModelFiles(model_dir, model, spec_chrom_csv, offset_pkl, token_file, protein_embeddings_dir)
            model_summary, symbols = validate_model_files(files, species, chrom_token_offset=chrom_token_offset)
        summary = {"model_files": model_summary}
        summary["dataset"] = validate_dataset(input_, symbols, gene_column, counts_layer,
                                              min_matched_genes, FilterSettings(filter_, min_cells, min_genes))
    except UserError as e:
        # The JSON carries the message too: the pipeline reports every bad dataset from it at once.
        write_json(output, {"error": str(e), "input": str(input_)})
        click.echo(f"ERROR: {e}", err=True)
        sys.exit(2)
    write_json(output, summary)
    log.info("%s: %d cells, %d genes, %d match %s", input_, summary["dataset"]["cells"], summary["dataset"]["genes"],
             summary["dataset"]["genes_matched"], species)
