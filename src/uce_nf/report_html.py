"""Rendering for `uce report` (see report.py): the self-contained HTML page (maps come from
report_map.py) and the MultiQC custom-content table.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
from typing import TYPE_CHECKING


from . import __version__
from .report import COSINE_CELLS, MAP_CELLS

if TYPE_CHECKING:
    from pathlib import Path

    from .report import Sample

log = logging.getLogger("uce_nf.report")

TOP_CATEGORIES = 20


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

def esc(v) -> str:
    return html.escape("" if v is None else str(v))


def fmt_int(v) -> str:
    return "–" if v is None else f"{int(v):,}"


def fmt_secs(v) -> str:
    if v is None:
        return "–"
    v = float(v)
    if v < 60:
        return f"{v:.1f} s" if v >= 1 else f"{v:.2f} s"
    if v < 3600:
        return f"{int(v // 60)} m {int(v % 60):02d} s"
    return f"{int(v // 3600)} h {int(v % 3600 // 60):02d} m"


def fmt_bytes(v) -> str:
    if v is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if v < 1024 or unit == "TB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return "–"


def pct(part, whole) -> str:
    if part is None or not whole:
        return ""
    return f' <span class="pct">{100 * part / whole:.1f}%</span>'


CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
 color:#1f2933;background:#f5f7fa;font-size:14px;line-height:1.45}
header{background:#1f3a5f;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px 0;font-size:22px;font-weight:600}
header .meta{font-size:13px;opacity:.85}
header .meta span{margin-right:18px}
main{padding:8px 32px 32px 32px;max-width:1500px}
h2{font-size:17px;margin:26px 0 8px 0;color:#1f3a5f;border-bottom:1px solid #d9e2ec;padding-bottom:4px}
p.note{color:#52606d;font-size:12.5px;margin:4px 0 8px 0;max-width:1100px}
.tablewrap{overflow-x:auto}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.06);font-size:13px}
th,td{padding:5px 10px;border-bottom:1px solid #e4e7eb;text-align:right;white-space:nowrap}
th{background:#e8eef5;color:#243b53;font-weight:600;text-align:center;font-size:12px}
td.l,th.l{text-align:left}
tr:hover td{background:#f0f4f8}
.pct{color:#7b8794;font-size:11.5px}
.sub{color:#7b8794;font-size:11.5px}
.ok{color:#1e7b34;font-weight:600}
.bad{color:#b42318;font-weight:600}
td.warn{background:#fde8e8}
.alerts{background:#fff4e5;border:1px solid #f5c16c;border-left:5px solid #e8590c;padding:8px 14px;margin:16px 0;
 border-radius:3px}
.alerts.good{background:#ebf8ee;border-color:#9ad4a8;border-left-color:#2f9e44}
.alerts ul{margin:4px 0;padding-left:20px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:11.5px;font-weight:600}
.badge.bad{background:#fde8e8;color:#b42318}
.badge.ok{background:#e3f5e8;color:#1e7b34}
.cards{display:flex;flex-wrap:wrap;gap:18px}
.card{background:#fff;box-shadow:0 1px 3px rgba(0,0,0,.08);border-radius:4px;padding:10px 14px;box-sizing:border-box;
 flex:0 1 calc(50% - 9px);min-width:460px;max-width:100%}
.card.wide{flex-basis:100%}
.card h3{margin:2px 0 6px 0;font-size:15px}
.card img{max-width:100%;height:auto;display:block}
.card .facts{font-size:12px;color:#52606d;margin:2px 0 6px 0}
.card .cw{color:#b42318;font-size:12.5px;font-weight:600;margin:4px 0}
footer{color:#7b8794;font-size:12px;padding:16px 32px}
code{background:#eef2f7;padding:0 3px;border-radius:2px;font-size:12px}
"""


OK_BADGE = '<span class="badge ok">ok</span>'


def _model(p: dict) -> str:
    if not p.get("model_file"):
        return "–"
    sha = str(p.get("model_sha256") or "")[:12]
    nl = p.get("nlayers")
    extra = " · ".join(x for x in [f"{nl} layers" if nl is not None else "", f"sha256 {sha}" if sha else ""] if x)
    return f'{esc(p["model_file"])}<br><span class="sub">{esc(extra)}</span>'


def render_html(samples: list[Sample], *, threshold: float, map_method: str, trace: dict | None,
                trace_path: Path | None, generated: dt.datetime, atlas=None, species: list[dict] = ()) -> str:
    run_dates = [dt.datetime.fromtimestamp(s.mtime, dt.timezone.utc) for s in samples]
    versions = sorted({str(s.prov.get("version")) for s in samples if s.prov.get("version")})
    alerts = [(s.name, w) for s in samples for w in s.warnings]

    out = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>UCE report: {esc(', '.join(s.name for s in samples))}</title>", f"<style>{CSS}</style></head><body>",
           "<header><h1>UCE embedding report</h1><div class=\"meta\">",
           f"<span>pipeline <b>uce-nf {esc(__version__)}</b></span>",
           f"<span>embeddings written by uce-nf {esc(', '.join(versions) or 'unknown')}</span>",
           f"<span>run date <b>{max(run_dates):%Y-%m-%d %H:%M} UTC</b></span>",
           f"<span>report generated {generated:%Y-%m-%d %H:%M} UTC</span>",
           f"<span>{len(samples)} sample{'s' if len(samples) != 1 else ''}</span></div></header><main>"]

    if alerts:
        out.append('<div class="alerts"><b>Warnings</b><ul>')
        out += [f"<li><b>{esc(n)}</b>: {esc(w)}</li>" for n, w in alerts]
        out.append("</ul></div>")
    else:
        out.append('<div class="alerts good"><b>All checks passed</b>: every embedding is finite and unit norm, '
                   f"and no sample's mean pairwise cosine exceeds {threshold:g}.</div>")

    # Cells and genes
    out.append("<h2>Cells and genes</h2>")
    out.append('<p class="note">Cells are dropped by the <code>min_genes</code> filter (fewer expressed genes '
               "than the threshold, counted over genes passing <code>min_cells</code>) or because all their counts "
               "are on genes without a protein embedding (nothing to sample a sentence from). Genes kept = genes "
               "passing <code>min_cells</code> that match a gene with a protein embedding for the species.</p>")
    out.append('<div class="tablewrap"><table><tr><th class="l">Sample</th><th class="l">Species</th><th>Cells in</th>'
               "<th>Cells kept</th><th>Dropped:<br>min_genes</th><th>Dropped: zero counts<br>on embedded genes</th>"
               "<th>Genes in</th><th>Genes &ge;<br>min_cells</th><th>Genes with<br>embedding</th><th>Genes kept</th>"
               '<th class="l">Filter</th><th class="l">Counts / symbols</th></tr>')
    for s in samples:
        p = s.pre
        filt = (f"min_cells {p.get('min_cells')}, min_genes {p.get('min_genes')}" if p.get("filter")
                else ("off" if "filter" in p else "–"))
        src = " / ".join(str(p[k]) for k in ("counts_source", "gene_symbols_from") if p.get(k)) or "–"
        out.append(
            f'<tr id="cells-{esc(s.name)}"><td class="l"><b>{esc(s.name)}</b></td>'
            f'<td class="l">{esc(s.prov.get("species") or p.get("species") or "–")}</td>'
            f"<td>{fmt_int(p.get('cells_in'))}</td>"
            f"<td>{fmt_int(p.get('cells_kept', s.n_cells))}{pct(p.get('cells_kept', s.n_cells), p.get('cells_in'))}</td>"
            f"<td>{fmt_int(p.get('cells_dropped_min_genes'))}</td><td>{fmt_int(p.get('cells_dropped_zero_counts'))}</td>"
            f"<td>{fmt_int(p.get('genes_in'))}</td><td>{fmt_int(p.get('genes_after_min_cells'))}</td>"
            f"<td>{fmt_int(p.get('genes_with_embedding'))}</td>"
            f"<td>{fmt_int(p.get('genes_kept'))}{pct(p.get('genes_kept'), p.get('genes_in'))}</td>"
            f'<td class="l">{esc(filt)}</td><td class="l">{esc(src)}</td></tr>')
    out.append("</table></div>")
    out.append('<p class="note"><b>Mapping back to your input.</b> Every output cell records its row in the input '
               "h5ad, <code>obs['uce_input_row']</code> (and its name, <code>obs['uce_input_name']</code>), which works "
               "even when obs names repeat: <code>adata_in.obsm['X_uce'] = np.full((adata_in.n_obs, out.obsm['X_uce']"
               ".shape[1]), np.nan, np.float32); adata_in.obsm['X_uce'][out.obs['uce_input_row'].to_numpy()] = "
               "out.obsm['X_uce']</code> (NaN rows: cells the filters dropped). With <code>--output_mode "
               "embeddings</code> the rows are the input's already (<code>obs['uce_embedded']</code> marks the "
               "embedded cells).</p>")

    # Per species (report_species.py)
    if species:
        from .report_species import render_species
        out += render_species(species)

    # Run settings and runtime
    out.append("<h2>Model, settings and runtime</h2>")
    out.append('<p class="note">Mode <code>reference</code> reproduces uce-model bit for bit; <code>none</code> '
               "is the context-free, batch-invariant default. Runtimes: preprocess and embed seconds recorded by the "
               "steps themselves (embed = sum over shards)"
               + ("; Nextflow task realtime per process from the trace file." if trace is not None else
                  "; pass <code>--trace pipeline_info/execution_trace_*.txt</code> for per-process Nextflow realtime.")
               + "</p>")
    out.append('<div class="tablewrap"><table><tr><th class="l">Sample</th><th class="l">Model</th><th>Mode</th>'
               "<th>Seed</th><th>Batch</th><th>Precision</th><th>Device</th><th>Shards</th><th>Preprocess</th>"
               "<th>Embed</th>" + ('<th class="l">Nextflow realtime per process</th>' if trace is not None else "")
               + "</tr>")
    for s in samples:
        p = s.prov
        row = (f'<tr id="run-{esc(s.name)}"><td class="l"><b>{esc(s.name)}</b></td><td class="l">{_model(p)}</td>'
               f"<td>{esc(p.get('compat', '–'))}</td><td>{esc(p.get('seed', '–'))}</td>"
               f"<td>{esc(p.get('batch_size', '–'))}</td><td>{esc(p.get('precision', '–'))}</td>"
               f"<td>{esc(_device(p))}</td><td>{esc(p.get('n_shards', '–'))}</td>"
               f"<td>{fmt_secs(s.pre.get('seconds'))}</td><td>{fmt_secs(p.get('embed_seconds'))}</td>")
        if trace is not None:
            parts = [f"{esc(k)} {fmt_secs(v['realtime_s'])}" + (f" ({v['tasks']} tasks)" if v["tasks"] > 1 else "")
                     for k, v in s.trace.items()]
            row += f'<td class="l">{"<br>".join(parts) or "no tasks tagged with this sample"}</td>'
        out.append(row + "</tr>")
    out.append("</table></div>")

    # Embedding QC
    out.append("<h2>Embedding QC</h2>")
    out.append(f'<p class="note">Every row of <code>X_uce</code> should be finite with norm 1. The mean pairwise '
               f"cosine similarity of a seeded sample of up to {COSINE_CELLS:,} cells detects collapse: a broken "
               f"model maps every cell to nearly the same vector (mean cosine &ge; 0.98). Embeddings that separate "
               f"cell types stay lower, though a shared direction (anisotropy) keeps many models well above 0. "
               f"Samples above {threshold:g} (<code>--collapse-threshold</code>) are flagged; a very homogeneous "
               f"sample can legitimately come close. The map below shows whether cell types separate.</p>")
    out.append('<div class="tablewrap"><table><tr><th class="l">Sample</th><th>Cells</th><th>Dim</th>'
               "<th>Norm min</th><th>Norm max</th><th>Non-finite<br>cells</th><th>Mean pairwise<br>cosine</th>"
               "<th>Cells<br>sampled</th><th>Status</th></tr>")
    for s in samples:
        q = s.qc
        mc = "–" if q["mean_cosine"] is None else f"{q['mean_cosine']:.3f}"
        nm = "–" if q["norm_min"] is None else f"{q['norm_min']:.4f}"
        nx = "–" if q["norm_max"] is None else f"{q['norm_max']:.4f}"
        status = []
        if q["collapsed"]:
            status.append('<span class="badge bad">possible collapse</span>')
        if not q["unit_norm"]:
            status.append('<span class="badge bad">not unit norm</span>')
        out.append(f'<tr id="qc-{esc(s.name)}"><td class="l"><b>{esc(s.name)}</b></td><td>{fmt_int(s.n_cells)}</td>'
                   f"<td>{s.dim}</td><td{' class=warn' if not q['unit_norm'] else ''}>{nm}</td>"
                   f"<td{' class=warn' if not q['unit_norm'] else ''}>{nx}</td><td>{fmt_int(q['non_finite_cells'])}</td>"
                   f"<td{' class=warn' if q['collapsed'] else ''}>{mc}</td><td>{fmt_int(q['cosine_cells'])}</td>"
                   f"<td>{' '.join(status) or OK_BADGE}</td></tr>")
    out.append("</table></div>")

    # Maps
    what = {"pca": "PCA", "umap": "UMAP"}
    out.append("<h2>Embedding maps</h2>")
    out.append(f'<p class="note">{what.get(map_method, map_method)} of a seeded sample of up to {MAP_CELLS:,} cells '
               f"per sample (requested: <code>--map {esc(map_method)}</code>). Colour: <code>--color-by</code>, "
               f"else the first obs column that looks like a cell type; the {TOP_CATEGORIES} most frequent "
               "categories are coloured, the rest grey.</p>")
    out.append('<div class="cards">')
    for s in samples:
        m = s.map_
        facts = [f"{what.get(m.get('method'), m.get('method'))} of {m['cells']:,} of {s.n_cells:,} cells"]
        if s.qc["mean_cosine"] is not None:
            facts.append(f"mean cosine {s.qc['mean_cosine']:.3f}")
        if m["color_by"]:
            facts.append("coloured by " + ", ".join(m["color_by"]) + (" (auto)" if m["color_by_auto"] else ""))
        else:
            facts.append("uncoloured: no cell-type-like obs column" if m["color_by_auto"] else "uncoloured")
        wide = " wide" if len(m["color_by"]) > 1 else ""
        out.append(f'<div class="card{wide}" id="map-{esc(s.name)}"><h3>{esc(s.name)}</h3>'
                   f'<div class="facts">{esc(" · ".join(facts))}</div>')
        if s.qc["collapsed"]:
            out.append(f'<div class="cw">&#9888; possible collapse: mean cosine {s.qc["mean_cosine"]:.3f} '
                       f"&gt; {threshold:g}</div>")
        if s.png:
            out.append(f'<img alt="{esc(s.name)} embedding map" '
                       f'src="data:image/png;base64,{base64.b64encode(s.png).decode()}">')
        out.append("</div>")
    out.append("</div>")

    # Atlas over all samples (report_atlas.py)
    if atlas is not None:
        from .report_atlas import render_atlas
        out += render_atlas(atlas)

    # Trace
    if trace is not None:
        out.append("<h2>Nextflow tasks</h2>")
        out.append(f'<p class="note">From <code>{esc(trace_path.name if trace_path else "")}</code>: completed and '
                   "cached tasks, realtime summed per process, largest peak RSS.</p>")
        out.append('<div class="tablewrap"><table><tr><th class="l">Process</th><th>Tasks</th><th>Realtime</th>'
                   "<th>Peak RSS</th></tr>")
        for proc, v in trace.items():
            out.append(f'<tr><td class="l">{esc(proc)}</td><td>{v["tasks"]}</td><td>{fmt_secs(v["realtime_s"])}</td>'
                       f"<td>{fmt_bytes(v['peak_rss_bytes'])}</td></tr>")
        out.append("</table></div>")

    out.append("</main><footer>Inputs: " + esc(", ".join(s.path.name for s in samples))
               + f". Generated by <code>uce report</code> (uce-nf {esc(__version__)}). Numbers also in "
               "<code>uce_summary.json</code> and <code>uce_mqc.json</code> (MultiQC custom content).</footer>"
               "</body></html>\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# MultiQC custom content
# ---------------------------------------------------------------------------------------------

def multiqc_content(samples: list[Sample], threshold: float) -> dict:
    def row(s: Sample) -> dict:
        p = s.pre
        d = {"cells_in": p.get("cells_in"), "cells_kept": p.get("cells_kept", s.n_cells),
             "pct_cells_kept": (100 * p["cells_kept"] / p["cells_in"]) if p.get("cells_in") and "cells_kept" in p else None,
             "cells_dropped_min_genes": p.get("cells_dropped_min_genes"),
             "cells_dropped_zero_counts": p.get("cells_dropped_zero_counts"),
             "genes_in": p.get("genes_in"), "genes_kept": p.get("genes_kept"),
             "mean_cosine": s.qc["mean_cosine"], "norm_min": s.qc["norm_min"], "norm_max": s.qc["norm_max"],
             "preprocess_seconds": p.get("seconds"), "embed_seconds": s.prov.get("embed_seconds")}
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items() if v is not None}

    count = {"format": "{:,.0f}", "scale": "Blues", "min": 0}
    return {
        "id": "uce_stats",
        "section_name": "UCE embeddings",
        "description": ("Cells and genes kept by <code>uce preprocess</code> and embedding QC of "
                        "<code>X_uce</code> (uce-nf). Mean pairwise cosine above "
                        f"{threshold:g} suggests collapsed embeddings; norms should be 1."),
        "plot_type": "table",
        "pconfig": {"id": "uce_stats_table", "title": "UCE: cells, genes and embedding QC", "namespace": "UCE",
                    "col1_header": "Sample"},
        "headers": {
            "cells_in": {"title": "Cells in", "description": "Cells in the input", **count},
            "cells_kept": {"title": "Cells kept", "description": "Cells embedded", **count},
            "pct_cells_kept": {"title": "% kept", "description": "Cells kept / cells in", "suffix": "%",
                               "min": 0, "max": 100, "scale": "RdYlGn", "format": "{:,.1f}"},
            "cells_dropped_min_genes": {"title": "Dropped (min_genes)", "description": "Cells below min_genes",
                                        **count, "scale": "Oranges"},
            "cells_dropped_zero_counts": {"title": "Dropped (zero counts)",
                                          "description": "Cells with no counts on genes that have an embedding",
                                          **count, "scale": "Oranges"},
            "genes_in": {"title": "Genes in", "description": "Genes in the input", **count, "hidden": True},
            "genes_kept": {"title": "Genes kept", "description": "Genes passing min_cells with a protein embedding",
                           **count},
            "mean_cosine": {"title": "Mean cosine", "description": "Mean pairwise cosine of up to 2,000 cells "
                            f"(collapse if > {threshold:g})", "min": 0, "max": 1, "scale": "RdYlGn-rev",
                            "format": "{:,.3f}"},
            "norm_min": {"title": "Norm min", "description": "Smallest embedding norm (should be 1)",
                         "format": "{:,.4f}", "hidden": True},
            "norm_max": {"title": "Norm max", "description": "Largest embedding norm (should be 1)",
                         "format": "{:,.4f}", "hidden": True},
            "preprocess_seconds": {"title": "Preprocess s", "description": "Seconds in uce preprocess",
                                   "format": "{:,.1f}", "hidden": True},
            "embed_seconds": {"title": "Embed s", "description": "Seconds in uce embed (all shards)",
                              "format": "{:,.1f}", "scale": "Purples"},
        },
        "data": {s.name: row(s) for s in samples},
    }


def _device(p: dict) -> str:
    """cpu, or cuda with the GPU model(s) and the device(s) the shards ran on (uuid or index)."""
    gpus = [str(g) for g in list(p.get("gpu_names", []))]
    devs = [str(d) for d in list(p.get("gpu_devices", []))]
    if not gpus:
        return str(p.get("device", "–"))
    return f"{p.get('device', 'cuda')}: {', '.join(gpus)}" + (f" ({', '.join(devs)})" if devs else "")

