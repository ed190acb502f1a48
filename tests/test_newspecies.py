"""A new species from its reference proteome (issue 13): Ensembl FASTA -> ESM2 per protein -> per gene ->
species files -> prepare-species -> `uce run`, through the CLI, with a tiny randomly initialised ESM2
saved as a real Hugging Face EsmModel folder (hidden size 32 = the demo checkpoint's token_dim)."""

from __future__ import annotations

import gzip
import logging
import pickle
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner

from conftest import run_uce

from uce_nf.cli import main

SPECIES, TAXON = "testfish", 7955
AMINO = "ACDEFGHIKLMNPQRSTVWY"
# fair-esm's / Hugging Face's ESM2 alphabet, in id order (33 tokens)
ESM_VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
N_GENES = 120  # uce run needs >= 100 matched genes
LONG = "GENE07-201"  # 1,500 residues: truncated to 1,022


def uce(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def header(pid, symbol, chrom, start, kind="chromosome", extra=""):
    sym = f" gene_symbol:{symbol}" if symbol else ""
    return (f">{pid} pep {kind}:TestAsm1:{chrom}:{start}:{start + 999}:1 gene:G{pid} transcript:T{pid} "
            f"gene_biotype:protein_coding transcript_biotype:protein_coding{sym} description:test protein{extra} "
            "[Source:ZFIN;Acc:ZDB-GENE-1]")


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    rng = np.random.default_rng(5)

    def seq(n):
        return "".join(rng.choice(list(AMINO), n))

    recs = []
    for g in range(1, N_GENES + 1):  # on 1, 2, X, one protein each
        recs.append((header(f"GENE{g:02d}-201", f"GENE{g:02d}", ["1", "2", "X"][g % 3], 10_000 * g), seq(int(rng.integers(30, 200)))))
    recs = [r for r in recs if not r[0].startswith(">GENE07-201")]
    recs.append((header(LONG, "GENE07", "1", 70_000), seq(1500)))
    # isoforms of GENE01: the gene gets the smallest start of its proteins
    recs.append((header("GENE01-202", "GENE01", "1", 5_000), seq(80)))  # its first protein is on chromosome 2
    recs.append((header("GENE01-203", "GENE01", "2", 3_000), seq(120)))
    recs.append((header("ZF-201", "si:ch211-12a3.4", "5", 8_000, kind="primary_assembly"), seq(90)))  # ':' in the symbol
    recs.append((header("ZF-202", "si:ch211-12a3.4", "5", 9_000, kind="primary_assembly"), seq(60)))
    recs.append((header("STOP-201", "GENESTOP", "1", 1_000), seq(40) + "*" + seq(10)))  # only protein has a stop
    recs.append((header("GENE02-202", "GENE02", "2", 1_000), seq(30) + "*"))
    recs.append((header("NOSYM-201", None, "1", 2_000, extra=" gene_symbol:FAKE"), seq(50)))  # symbol only in free text
    path = tmp_path_factory.mktemp("fasta") / "Testus_fishus.TestAsm1.pep.all.fa.gz"
    with gzip.open(path, "wt") as f:
        for h, s in recs:
            f.write(h + "\n" + "\n".join(s[i:i + 60] for i in range(0, len(s), 60)) + "\n")
    return path


@pytest.fixture(scope="module")
def esm_dir(tmp_path_factory):
    from transformers import EsmConfig, EsmModel, EsmTokenizer
    d = tmp_path_factory.mktemp("esm") / "esm2_tiny"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(ESM_VOCAB) + "\n")
    EsmTokenizer(str(d / "vocab.txt")).save_pretrained(d)  # built offline from the fixed vocabulary
    torch.manual_seed(0)
    cfg = EsmConfig(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=1026, position_embedding_type="rotary", token_dropout=True,
                    emb_layer_norm_before=False, pad_token_id=1, mask_token_id=32, layer_norm_eps=1e-5)
    EsmModel(cfg, add_pooling_layer=False).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def chain(fasta, esm_dir, model_dir, tmp_path_factory):
    w = tmp_path_factory.mktemp("chain")
    run_uce("proteome", "--fasta", fasta, "--species", SPECIES, "--output-dir", w / "prot", "--chunks", 2)
    chunks = sorted((w / "prot").glob("proteins.chunk-*.tsv"))
    for c in chunks:
        run_uce("esm-embed", "--proteins", c, "--esm-model", esm_dir, "--output", w / f"{c.stem}.pt", "--device", "cpu",
                "--token-budget", 2048, "--checkpoint", model_dir / "4layer_model.torch")
    genes = w / "Testus_fishus.TestAsm1.gene_symbol_to_embedding_ESM2.pt"
    run_uce("gene-embeddings", "--embeddings", w / f"{chunks[0].stem}.pt", "--embeddings", w / f"{chunks[1].stem}.pt",
            "--proteins", w / "prot" / "proteins.tsv", "--output", genes)
    code, out = uce("species-files", "--species", SPECIES, "--taxonomy-id", TAXON, "--gene-embeddings", genes,
                    "--chrom-csv", w / "prot" / f"{SPECIES}_chrom.csv", "--special-tokens", model_dir / "all_tokens.torch",
                    "--checkpoint", model_dir / "4layer_model.torch", "--output-dir", w / "model_files")
    assert code == 0, out
    return {"w": w, "chunks": chunks, "genes": genes, "md": w / "model_files", "out": out}


def test_proteome_drops_stops_and_symbol_less_proteins_and_keeps_colon_symbols(chain):
    prot = pd.read_csv(chain["w"] / "prot" / "proteins.tsv", sep="\t", dtype=str)
    assert list(prot.columns) == ["protein_id", "gene_symbol", "sequence"]
    assert not prot["sequence"].str.contains(r"\*").any()
    assert not {"STOP-201", "GENE02-202", "NOSYM-201"} & set(prot["protein_id"])
    assert "FAKE" not in set(prot["gene_symbol"]) and "GENESTOP" not in set(prot["gene_symbol"])
    assert (prot["gene_symbol"] == "si:ch211-12a3.4").sum() == 2
    assert len(prot) == N_GENES + 2 + 2 and prot["gene_symbol"].nunique() == N_GENES + 1
    import json
    stats = json.loads((chain["w"] / "prot" / "proteome.json").read_text())
    assert (stats["records"], stats["dropped_stop_codon"], stats["dropped_no_gene_symbol"]) == (N_GENES + 7, 2, 1)
    assert stats["gene_embeddings_file"] == chain["genes"].name
    chrom = pd.read_csv(chain["w"] / "prot" / f"{SPECIES}_chrom.csv", dtype={"chromosome": str})
    # the notebook's table: every header with a symbol and a location (GENESTOP's too), the last one wins
    assert list(chrom.columns) == ["gene_symbol", "chromosome", "start", "species"] and len(chrom) == N_GENES + 2
    row = chrom.set_index("gene_symbol")
    assert (row.loc["GENE01", "chromosome"], row.loc["GENE01", "start"]) == ("2", 3_000)  # GENE01-203, not -201/-202
    assert (row.loc["SI:CH211-12A3.4", "chromosome"], row.loc["SI:CH211-12A3.4", "start"]) == ("5", 9_000)
    assert (row.loc["GENE02", "start"], row.loc["GENESTOP", "chromosome"]) == (1_000, "1")
    assert list(chrom.index) == list(chrom.sort_values(["chromosome", "start"], key=lambda c: c.astype(str)).index)
    # two chunks: a partition of proteins.tsv, balanced by (truncated) residues, FASTA order kept
    parts = [pd.read_csv(c, sep="\t", dtype=str) for c in chain["chunks"]]
    assert sorted(pd.concat(parts)["protein_id"]) == sorted(prot["protein_id"])
    totals = [p["sequence"].str.len().clip(upper=1022).sum() for p in parts]
    assert abs(totals[0] - totals[1]) <= 200, totals  # at most one protein's length apart
    order = {p: i for i, p in enumerate(prot["protein_id"])}
    assert all(list(p["protein_id"]) == sorted(p["protein_id"], key=order.get) for p in parts)


def test_mean_over_residues_matches_a_direct_computation(chain, esm_dir):
    from transformers import EsmModel, EsmTokenizer
    model = EsmModel.from_pretrained(esm_dir, add_pooling_layer=False).eval()
    tok = EsmTokenizer.from_pretrained(esm_dir)
    prot = pd.read_csv(chain["w"] / "prot" / "proteins.tsv", sep="\t", dtype=str).set_index("protein_id")
    saved = {}
    for c in chain["chunks"]:
        obj = torch.load(chain["w"] / f"{c.stem}.pt", weights_only=True)
        saved.update(zip(obj["protein_ids"], obj["embeddings"]))
    for pid in ("GENE01-201", "ZF-202", LONG):
        s = prot.loc[pid, "sequence"]
        ids = tok(s[:1022])["input_ids"]  # the Hugging Face tokenizer: <cls> residues <eos>
        assert len(ids) == min(len(s), 1022) + 2
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        direct = h[1:-1].mean(0)  # residues only: BOS and EOS excluded
        assert torch.allclose(saved[pid], direct, atol=1e-5), pid
        assert not torch.allclose(saved[pid], h.mean(0), atol=1e-4)  # BOS/EOS would change it
    assert len(prot.loc[LONG, "sequence"]) == 1500


def test_esm_embed_resumes_and_redoes_a_stale_output(chain, esm_dir, tmp_path, caplog):
    c = chain["chunks"][0]
    out = chain["w"] / f"{c.stem}.pt"
    before = (out.stat().st_mtime_ns, out.read_bytes())
    with caplog.at_level(logging.INFO, logger="uce_nf"):
        run_uce("esm-embed", "--proteins", c, "--esm-model", esm_dir, "--output", out, "--device", "cpu")
    assert (out.stat().st_mtime_ns, out.read_bytes()) == before
    assert "already done for these proteins and this model; kept" in caplog.text
    # another protein set: the old output is not reused
    other = tmp_path / "other.tsv"
    df = pd.read_csv(c, sep="\t", dtype=str).iloc[:3]
    df.to_csv(other, sep="\t", index=False)
    stale = tmp_path / "stale.pt"
    shutil.copy(out, stale)
    run_uce("esm-embed", "--proteins", other, "--esm-model", esm_dir, "--output", stale, "--device", "cpu")
    obj = torch.load(stale, weights_only=True)
    assert obj["protein_ids"] == list(df["protein_id"]) and obj["embeddings"].shape == (3, 32)


def test_gene_embedding_is_the_mean_of_its_isoforms_in_fasta_order(chain):
    genes = torch.load(chain["genes"], weights_only=True)
    prot = pd.read_csv(chain["w"] / "prot" / "proteins.tsv", sep="\t", dtype=str)
    assert list(genes) == list(dict.fromkeys(prot["gene_symbol"]))
    saved = {}
    for c in chain["chunks"]:
        obj = torch.load(chain["w"] / f"{c.stem}.pt", weights_only=True)
        saved.update(zip(obj["protein_ids"], obj["embeddings"]))
    iso = torch.stack([saved[p] for p in ("GENE01-201", "GENE01-202", "GENE01-203")]).mean(0)
    assert genes["GENE01"].dtype == torch.float32 and torch.allclose(genes["GENE01"], iso, atol=1e-6)
    assert torch.equal(genes["GENE05"], saved["GENE05-201"])
    # a chunk left out: one line naming the fix
    code, out = uce("gene-embeddings", "--embeddings", chain["w"] / f"{chain['chunks'][0].stem}.pt", "--proteins",
                    chain["w"] / "prot" / "proteins.tsv", "--output", chain["w"] / "x.pt")
    assert code == 2 and "have no embedding" in out and len(out.strip().splitlines()) == 1, out
    assert not (chain["w"] / "x.pt").exists()


def test_species_files_follow_the_recipe_and_prepare_species_infers_the_offset(chain, model_dir, tmp_path):
    md = chain["md"]
    genes = torch.load(chain["genes"], weights_only=True)
    n_genes, n_chrom = len(genes), 4  # chromosomes 1, 2, X and 5
    assert f"CHROM_TOKEN_OFFSET = {4 + n_genes}" in chain["out"]
    table = torch.load(md / "all_tokens.torch", weights_only=True)
    assert table.shape == (4 + n_genes + n_chrom, 32) and table.dtype == torch.float32
    assert torch.equal(table[:4], torch.load(model_dir / "all_tokens.torch", weights_only=True)[:4])
    assert torch.equal(table[4:4 + n_genes], torch.stack(list(genes.values())))
    torch.manual_seed(TAXON)  # the notebook's way: the global seed, then torch.normal
    assert torch.equal(table[4 + n_genes:], torch.normal(0, 1, size=(n_chrom, 32)))
    with open(md / "species_offsets.pkl", "rb") as f:
        assert pickle.load(f) == {SPECIES: 4}
    assert pd.read_csv(md / "new_species_protein_embeddings.csv").to_dict("records") == [
        {"species": SPECIES, "path": chain["genes"].name}]
    assert (md / "protein_embeddings" / chain["genes"].name).exists() and (md / "4layer_model.torch").is_symlink()

    run_uce("prepare-species", "--species", SPECIES, "--model-dir", md, "--output", tmp_path / "t.species.pt")
    sf = torch.load(tmp_path / "t.species.pt", weights_only=False)
    assert sf["chrom_token_offset"] == 4 + n_genes  # inferred from the layout, nobody passed it
    assert sf["symbols"][:2] == ["GENE01", "GENE02"] and int(sf["token_ids"][0]) == 4
    assert bool(sf["in_chrom_csv"].all())

    # same taxonomy id -> the same chromosome rows; another id -> others
    again = tmp_path / "again"
    run_uce("species-files", "--species", SPECIES, "--taxonomy-id", TAXON, "--gene-embeddings", chain["genes"],
            "--chrom-csv", md / "species_chrom.csv", "--special-tokens", model_dir / "all_tokens.torch", "--output-dir", again)
    assert torch.equal(torch.load(again / "all_tokens.torch", weights_only=True), table)
    run_uce("species-files", "--species", SPECIES, "--taxonomy-id", 9031, "--gene-embeddings", chain["genes"],
            "--chrom-csv", md / "species_chrom.csv", "--special-tokens", model_dir / "all_tokens.torch", "--output-dir", again)
    assert not torch.equal(torch.load(again / "all_tokens.torch", weights_only=True)[-n_chrom:], table[-n_chrom:])


def test_uce_run_embeds_a_dataset_of_the_new_species(chain, tmp_path):
    symbols = list(torch.load(chain["genes"], weights_only=True))
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(3.0, (60, len(symbols))).astype(np.float32))
    a = ad.AnnData(X, obs=pd.DataFrame(index=[f"cell{i}" for i in range(60)]), var=pd.DataFrame(index=symbols))
    a.write_h5ad(tmp_path / "fish.h5ad")
    run_uce("run", "--input", tmp_path / "fish.h5ad", "--species", SPECIES, "--model-dir", chain["md"],
            "--output", tmp_path / "fish_uce_adata.h5ad", "--device", "cpu")
    emb = ad.read_h5ad(tmp_path / "fish_uce_adata.h5ad").obsm["X_uce"]
    assert emb.shape[0] == 60 and np.isfinite(emb).all()
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)


def test_chicken_numbers_of_the_notebook(tmp_path):
    """The notebook's chicken: taxonomy 9031 and CHROM_TOKEN_OFFSET 13275, i.e. 4 + 13,271 genes."""
    n, width = 13_271, 8
    g = torch.Generator().manual_seed(1)
    genes = {f"G{i}": v for i, v in enumerate(torch.randn(n, width, generator=g))}
    torch.save(genes, tmp_path / "Gallus_gallus.bGalGal1.mat.broiler.GRCg7b.gene_symbol_to_embedding_ESM2.pt")
    pd.DataFrame({"species": "chicken", "gene_symbol": list(genes), "chromosome": [str(i % 30 + 1) for i in range(n)],
                  "start": range(n)}).to_csv(tmp_path / "chicken_chrom.csv", index=False)
    torch.save(torch.randn(4, width, generator=g), tmp_path / "special.torch")
    code, out = uce("species-files", "--species", "chicken", "--taxonomy-id", 9031, "--gene-embeddings",
                    tmp_path / "Gallus_gallus.bGalGal1.mat.broiler.GRCg7b.gene_symbol_to_embedding_ESM2.pt",
                    "--chrom-csv", tmp_path / "chicken_chrom.csv", "--special-tokens", tmp_path / "special.torch",
                    "--output-dir", tmp_path / "chicken")
    assert code == 0 and "CHROM_TOKEN_OFFSET = 13275" in out, out
    assert torch.load(tmp_path / "chicken" / "all_tokens.torch", weights_only=True).shape == (13_275 + 30, width)


@pytest.mark.parametrize("case,words", [
    ("builtin", "one of the 8 built-in UCE species"),
    ("width", "does not match the token_dim 32"),
    ("no_symbols", "no header has a gene_symbol: field"),
    ("esm_width", "width 16 does not match the token_dim 32"),
])
def test_one_line_errors(case, words, chain, model_dir, esm_dir, tmp_path):
    if case == "builtin":
        args = ["proteome", "--fasta", chain["w"] / "prot" / "proteins.tsv", "--species", "human", "--output-dir", tmp_path]
    elif case == "width":
        genes = {"A": torch.zeros(16), "B": torch.ones(16)}
        torch.save(genes, tmp_path / "g.pt")
        pd.DataFrame({"species": SPECIES, "gene_symbol": ["A", "B"], "chromosome": "1", "start": [1, 2]}).to_csv(
            tmp_path / "c.csv", index=False)
        args = ["species-files", "--species", SPECIES, "--taxonomy-id", 1, "--gene-embeddings", tmp_path / "g.pt",
                "--chrom-csv", tmp_path / "c.csv", "--special-tokens", model_dir / "all_tokens.torch",
                "--checkpoint", model_dir / "4layer_model.torch", "--output-dir", tmp_path / "o"]
    elif case == "esm_width":  # checked from config.json, before any weights are loaded
        wide = tmp_path / "esm16"
        shutil.copytree(esm_dir, wide)
        (wide / "config.json").write_text((esm_dir / "config.json").read_text().replace('"hidden_size": 32', '"hidden_size": 16'))
        args = ["esm-embed", "--proteins", chain["chunks"][0], "--esm-model", wide, "--output", tmp_path / "o" / "e.pt",
                "--checkpoint", model_dir / "4layer_model.torch", "--device", "cpu"]
    else:
        (tmp_path / "x.fa").write_text(">P1 pep chromosome:A:1:1:9:1 gene:G1\nMKV\n>P2 pep chromosome:A:1:1:9:1 gene:G2\nMKL\n")
        args = ["proteome", "--fasta", tmp_path / "x.fa", "--species", SPECIES, "--output-dir", tmp_path / "o"]
    code, out = uce(*args)
    assert code == 2 and words in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "o").exists()


def test_symbols_colliding_after_upper_casing_keep_first_position_and_last_value(model_dir, tmp_path, caplog):
    """prepare-species upper-cases the vocabulary (first position wins); the token rows must line up."""
    v = {k: torch.full((32,), float(i)) for i, k in enumerate(["abc1", "GENEB", "ABC1"])}
    torch.save(v, tmp_path / "g.pt")
    pd.DataFrame({"species": SPECIES, "gene_symbol": ["ABC1", "GENEB"], "chromosome": ["1", "2"], "start": [1, 2]}).to_csv(
        tmp_path / "c.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="uce_nf"):
        code, out = uce("species-files", "--species", SPECIES, "--taxonomy-id", 1, "--gene-embeddings", tmp_path / "g.pt",
                        "--chrom-csv", tmp_path / "c.csv", "--special-tokens", model_dir / "all_tokens.torch",
                        "--checkpoint", model_dir / "4layer_model.torch", "--output-dir", tmp_path / "md")
    assert code == 0 and "CHROM_TOKEN_OFFSET = 6" in out, out
    assert "1 gene symbols collide after upper-casing" in caplog.text
    table = torch.load(tmp_path / "md" / "all_tokens.torch", weights_only=True)
    assert table.shape[0] == 4 + 2 + 2 and table[4, 0] == 2.0 and table[5, 0] == 1.0  # ABC1: last value; GENEB
    run_uce("prepare-species", "--species", SPECIES, "--model-dir", tmp_path / "md", "--output", tmp_path / "t.pt")
    sf = torch.load(tmp_path / "t.pt", weights_only=False)
    assert sf["symbols"] == ["ABC1", "GENEB"] and sf["chrom_token_offset"] == 6


def test_batching_and_padding_do_not_change_the_embeddings(chain, esm_dir):
    """Length-sorted batches pad to the batch's longest protein; padding is masked out of attention and mean.
    bf16 (what a GPU runs) stays close to fp32."""
    from uce_nf import esm
    prot = pd.read_csv(chain["chunks"][1], sep="\t", dtype=str)
    seqs, vocab, cpu = list(prot["sequence"]), esm.read_vocab(esm_dir), torch.device("cpu")
    model = esm.load_model(esm_dir, cpu, torch.float32)
    one, _ = esm.embed_proteins(model, vocab, seqs, cpu, 1026)  # mostly one protein per batch
    many, _ = esm.embed_proteins(model, vocab, seqs, cpu, 100_000)  # all in one padded batch
    assert torch.allclose(one, many, atol=1e-5)
    bf16, _ = esm.embed_proteins(esm.load_model(esm_dir, cpu, torch.bfloat16), vocab, seqs, cpu, 8192)
    assert bf16.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(bf16, one).min() > 0.99
