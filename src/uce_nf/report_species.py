"""The report's Species section (issue 13): one row per species of the run, built from the ``species``
block that `uce merge --summary` copies out of the species file MERGE read; REPORT stages no species file.

species_block()    at MERGE: scalars of the species file only (no per-gene arrays), so the summary stays small;
species_rows()     at REPORT: the samples grouped by species (and by species file, should two summaries of one
                   species come from different files), with each dataset's share of genes in the vocabulary;
render_species()   the HTML table; species_multiqc() the same rows as MultiQC custom content.

What is not recorded is said so: species files made before uce-nf recorded where a species came from and how
its chromosome token offset was found, and summaries without the block (older ones, or built from an h5ad).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .report import Sample

NOT_RECORDED = "not recorded"
SHA_PREFIX = 12


def species_block(sf: dict) -> dict:
    """The species file's numbers the report shows. `sf`: a species file (species.load_species)."""
    in_csv = np.asarray(sf["in_chrom_csv"], dtype=bool)
    chroms = np.unique(np.asarray(sf["chrom_codes"])[in_csv])  # global category codes of this species' genes
    ids = np.asarray(sf["token_ids"])
    offset = int(sf["chrom_token_offset"])
    model = sf.get("model") or {}
    return {
        "name": str(sf["species"]), "origin": sf.get("origin"),
        "genes": len(sf["symbols"]), "genes_on_chromosomes": int(in_csv.sum()), "chromosomes": len(chroms),
        "chrom_token_offset": offset, "chrom_token_offset_how": sf.get("chrom_token_offset_how"),
        "gene_token_first": int(ids.min()) if len(ids) else None, "gene_token_last": int(ids.max()) if len(ids) else None,
        "chrom_token_first": offset + int(chroms.min()) if len(chroms) else None,
        "chrom_token_last": offset + int(chroms.max()) if len(chroms) else None,
        "checkpoint": model.get("file"), "checkpoint_sha256": model.get("sha256"),
    }


def _origin(block: dict) -> dict:
    o = block.get("origin") if block else None
    if not isinstance(o, dict) or "kind" not in o:
        return {"origin": NOT_RECORDED, "source": None, "taxonomy_id": None}
    return {"origin": str(o["kind"]), "source": o.get("source"), "taxonomy_id": o.get("taxonomy_id")}


def _dataset(s: Sample, min_share: float) -> dict:
    from .report import matched_share
    share = matched_share(s.pre)
    return {"name": s.name, "genes_in": s.pre.get("genes_in"), "genes_matched": s.pre.get("genes_with_embedding"),
            "share": share, "low": share is not None and share < min_share}


def species_rows(samples: list[Sample]) -> list[dict]:
    """One row per (species, species block), sorted by species, datasets in report order."""
    from .report import MIN_MATCHED_SHARE
    groups: dict[tuple[str, str], dict] = {}
    for s in samples:
        block = s.species or {}
        name = str(block.get("name") or s.prov.get("species") or s.pre.get("species") or "unknown")
        numbers = {k: v for k, v in block.items() if k not in ("name", "origin")}
        row = groups.setdefault((name, json.dumps(block, sort_keys=True)), {
            "species": name, "recorded": bool(block), **_origin(block), **numbers, "datasets": []})
        row["datasets"].append(_dataset(s, MIN_MATCHED_SHARE))
    rows = sorted(groups.values(), key=lambda r: r["species"])
    for i, r in enumerate(rows):  # unique ids even where one species has rows of two species files
        same = [x for x in rows[:i] if x["species"] == r["species"]]
        r["id"] = r["species"] + (f" ({len(same) + 1})" if same else "")
    return rows


def _id_range(r: dict) -> str | None:
    return f"{r['gene_token_first']:,}–{r['gene_token_last']:,}" if r.get("gene_token_first") is not None else None


def render_species(rows: list[dict]) -> list[str]:
    from .report import MIN_MATCHED_SHARE
    from .report_html import esc, fmt_int
    sub = '<br><span class="sub">{}</span>'.format
    out = ["<h2>Species</h2>",
           '<p class="note">Per species of the run, from the species file each dataset was embedded with. '
           "<b>Vocabulary</b>: genes with a protein embedding (the species' gene block of the token table); only "
           "the genes with a chromosome position in <code>species_chrom.csv</code> can enter a sentence. "
           "Chromosome token = offset + chromosome category code; the offset is <i>given</i> "
           "(<code>--chrom_token_offset</code>), the <i>reference default</i> 143574 with the checkpoint's own "
           "token table, or <i>inferred</i> from the layout of a replaced token file (a new species: 4 + its "
           "genes). <b>Genes matched</b>: the share of a dataset's genes in the vocabulary; below "
           f"{MIN_MATCHED_SHARE:.0%} it is flagged, as in the warnings above.</p>",
           '<div class="tablewrap"><table><tr><th class="l">Species</th><th class="l">Origin</th><th>Genes in<br>'
           "vocabulary</th><th>Genes on<br>chromosomes</th><th>Chromosomes</th><th>Chromosome<br>token offset</th>"
           '<th>Gene<br>token ids</th><th class="l">Checkpoint</th><th class="l">Datasets: genes matched</th></tr>']
    for r in rows:
        origin = esc(r["origin"])
        if r["origin"] == "new":
            facts = [r["source"] or "", f"taxonomy id {r['taxonomy_id']}" if r["taxonomy_id"] is not None else ""]
            origin += sub(esc(" · ".join(f for f in facts if f) or f"provenance {NOT_RECORDED}"))
        cells = [f'<td class="l"><b>{esc(r["species"])}</b></td>', f'<td class="l">{origin}</td>']
        if r["recorded"]:
            placed = r["genes_on_chromosomes"]
            share = f' <span class="pct">{100 * placed / r["genes"]:.1f}%</span>' if r["genes"] else ""
            ids = _id_range(r) or "–"
            sha = str(r["checkpoint_sha256"] or "")[:SHA_PREFIX]
            cells += [f"<td>{fmt_int(r['genes'])}</td>", f"<td>{fmt_int(placed)}{share}</td>",
                      f"<td>{fmt_int(r['chromosomes'])}</td>",
                      f"<td>{fmt_int(r['chrom_token_offset'])}{sub(esc(r['chrom_token_offset_how'] or 'how: ' + NOT_RECORDED))}</td>",
                      f"<td>{ids}</td>",
                      f'<td class="l">{esc(r["checkpoint"] or NOT_RECORDED)}{sub("sha256 " + esc(sha)) if sha else ""}</td>']
        else:
            cells.append(f'<td class="l" colspan="6">{NOT_RECORDED}: the summaries of these datasets carry no species '
                         "block (written before uce-nf recorded it, or built from the h5ad)</td>")
        matched = []
        for d in r["datasets"]:
            if d["share"] is None:
                matched.append(f"{esc(d['name'])} –")
                continue
            text = f"{esc(d['name'])} {fmt_int(d['genes_matched'])} of {fmt_int(d['genes_in'])} ({100 * d['share']:.1f}%)"
            matched.append(f'<span class="bad">{text}</span>' if d["low"] else text)
        cells.append(f'<td class="l">{"<br>".join(matched)}</td>')
        out.append(f'<tr id="species-{esc(r["id"])}">' + "".join(cells) + "</tr>")
    out.append("</table></div>")
    return out


def species_multiqc(rows: list[dict]) -> dict:
    """MultiQC custom content (report/uce_species_mqc.json): one table row per species."""
    count = {"format": "{:,.0f}", "min": 0, "scale": False}
    headers = {
        "origin": {"title": "Origin", "description": "built-in (UCE's own) or new (--species_sheet)"},
        "genes": {"title": "Genes", "description": "Genes in the species' vocabulary", **count},
        "genes_on_chromosomes": {"title": "On chromosomes", "description": "Vocabulary genes in species_chrom.csv", **count},
        "chromosomes": {"title": "Chromosomes", "description": "Chromosomes of the vocabulary's genes", **count},
        "chrom_token_offset": {"title": "Chrom. offset", "description": "chrom_token_offset", **count},
        "offset_how": {"title": "Offset from", "description": "given, reference default or inferred"},
        "gene_tokens": {"title": "Gene token ids", "description": "Token ids of the species' gene block"},
        "checkpoint": {"title": "Checkpoint", "description": "The model file the species file was prepared for"},
        "checkpoint_sha256": {"title": "sha256", "description": f"First {SHA_PREFIX} hex digits", "hidden": True},
        "datasets": {"title": "Datasets", "description": "Datasets of this species", **count},
        "min_matched_pct": {"title": "Min % matched", "description": "Smallest share of a dataset's genes in the "
                            "vocabulary", "suffix": "%", "min": 0, "max": 100, "scale": "RdYlGn", "format": "{:,.1f}"},
    }

    def row(r: dict) -> dict:
        shares = [d["share"] for d in r["datasets"] if d["share"] is not None]
        d = {"origin": r["origin"], "datasets": len(r["datasets"]),
             "min_matched_pct": round(100 * min(shares), 1) if shares else None}
        if r["recorded"]:
            d.update({k: r[k] for k in ("genes", "genes_on_chromosomes", "chromosomes", "chrom_token_offset")})
            d.update({"offset_how": r["chrom_token_offset_how"] or NOT_RECORDED, "gene_tokens": _id_range(r),
                      "checkpoint": r["checkpoint"] or NOT_RECORDED,
                      "checkpoint_sha256": str(r["checkpoint_sha256"] or NOT_RECORDED)[:SHA_PREFIX]})
        return {k: d[k] for k in headers if d.get(k) is not None}

    return {
        "id": "uce_species",
        "section_name": "UCE species",
        "description": ("Per species of the run (uce-nf): vocabulary (genes with a protein embedding), genes on "
                        "chromosomes, chromosome token offset and how it was found, checkpoint, and the smallest "
                        "share of a dataset's genes in the vocabulary."),
        "plot_type": "table",
        "pconfig": {"id": "uce_species_table", "title": "UCE: species", "namespace": "UCE species",
                    "col1_header": "Species"},
        "headers": headers,
        "data": {r["id"]: row(r) for r in rows},
    }
