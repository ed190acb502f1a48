"""The atlas section of `uce report`: what `uce atlas` wrote into its output folder
(atlas_summary.json, the UMAP and confusion-matrix PNGs), as static HTML: the maps embedded as
base64 PNGs, the integration metrics, and the label-transfer accuracy with its confusion matrix.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from .io import UserError

SUMMARY = "atlas_summary.json"
# map PNG -> caption, in the order shown
MAPS = [("atlas_umap_sample_mqc.png", "by sample"), ("atlas_umap_species_mqc.png", "by species"),
        ("atlas_umap_label_mqc.png", "by label"), ("atlas_umap_leiden_mqc.png", "by Leiden cluster")]
CONFUSION = "atlas_confusion_mqc.png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Atlas:
    summary: dict
    pngs: dict = field(default_factory=dict)  # file name -> PNG bytes


def read_atlas(folder: Path) -> Atlas:
    path = folder / SUMMARY
    try:
        summ = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable atlas summary ({e}); pass the output folder of `uce atlas` "
                        "as --atlas-dir") from None
    if not isinstance(summ, dict):
        raise UserError(f"{path}: not an atlas summary (a JSON object is expected); re-run `uce atlas`")
    pngs = {}
    for name in [m for m, _ in MAPS] + [CONFUSION]:
        f = folder / name
        if f.is_file():
            data = f.read_bytes()
            if data[:8] == PNG_MAGIC:  # stub runs leave empty files: nothing to show
                pngs[name] = data
    return Atlas(summ, pngs)


def esc(v) -> str:
    return html.escape("" if v is None else str(v))


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return esc(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * float(v):.1f}%"


def _img(name: str, data: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _per_sample(summ: dict) -> dict:
    per = summ.get("samples") or summ.get("per_sample") or {}
    return per if isinstance(per, dict) else {}


def _confusion_table(query: str, conf: dict) -> list[str]:
    """Rows: the query's own labels (truth); columns: transferred labels. Cells shaded by the
    share of their row, so a good transfer shows a dark diagonal."""
    labels, matrix = conf.get("labels") or [], conf.get("matrix") or []
    true_labels = conf.get("true_labels") or labels
    pred_labels = conf.get("predicted_labels") or labels
    if not matrix:
        return []
    out = [f'<div class="tablewrap"><table class="confusion" id="atlas-confusion-{esc(query)}">'
           f'<tr><th class="l">{esc(query)}: truth \\ transferred</th>'
           + "".join(f"<th>{esc(p)}</th>" for p in pred_labels) + "</tr>"]
    for lab, row in zip(true_labels, matrix):
        total = sum(row) or 1
        cells = []
        for v in row:
            share = v / total
            bg = f"rgba(31,58,95,{share:.2f})"
            fg = "#fff" if share > 0.55 else "#1f2933"
            cells.append(f'<td style="background:{bg};color:{fg}">{int(v):,}</td>' if v else "<td></td>")
        out.append(f'<tr><td class="l"><b>{esc(lab)}</b></td>{"".join(cells)}</tr>')
    out.append("</table></div>")
    return out


def render_atlas(atlas: Atlas) -> list[str]:
    """HTML lines of the atlas section."""
    s = atlas.summary
    per = _per_sample(s)
    n = s.get("n_cells")
    species = sorted({str(v.get("species")) for v in per.values() if isinstance(v, dict) and v.get("species")})
    out = ['<h2 id="atlas">Atlas</h2>',
           f'<p class="note"><code>atlas/uce_atlas.h5ad</code>: {_num(n)} embedded cells of {len(per)} samples '
           f"({esc(', '.join(species) or 'species unknown')}) in one UCE space, without batch correction, in "
           "samplesheet order; <code>obsm['X_uce']</code>, <code>obsm['X_umap']</code> and <code>obs['leiden']</code> "
           "(cosine neighbours on X_uce, seeded), plus the transferred labels when reference samples were "
           "given. Cells of different datasets, or species, that share a cell type should overlap.</p>"]
    if per:
        out.append('<div class="tablewrap"><table><tr><th class="l">Sample</th><th class="l">Species</th>'
                   "<th>Cells in the atlas</th></tr>")
        for name, v in per.items():
            v = v if isinstance(v, dict) else {}
            out.append(f'<tr id="atlas-sample-{esc(name)}"><td class="l"><b>{esc(name)}</b></td>'
                       f'<td class="l">{esc(v.get("species", "–"))}</td><td>{_num(v.get("n_cells"))}</td></tr>')
        out.append("</table></div>")

    maps = [(f, cap) for f, cap in MAPS if f in atlas.pngs]
    if maps:
        umap = s.get("umap") if isinstance(s.get("umap"), dict) else {}
        if umap.get("cells_fit") is not None:
            out.append(f'<p class="note">UMAP and Leiden on {_num(umap.get("cells_fit"))} cells'
                       + (f", {_num(umap.get('cells_projected'))} more placed from their nearest fitted cells"
                          if umap.get("cells_projected") else "") + ".</p>")
        out.append('<div class="cards">')
        for f, cap in maps:
            out.append(f'<div class="card" id="atlas-map-{esc(f.split("_")[2])}"><h3>UMAP {esc(cap)}</h3>'
                       + _img(f, atlas.pngs[f], f"atlas UMAP {cap}") + "</div>")
        out.append("</div>")

    metrics = s.get("metrics") if isinstance(s.get("metrics"), dict) else {}
    out.append("<h3>Integration metrics</h3>")
    if metrics:
        secs = s.get("metrics_seconds")
        cells = s.get("metrics_cells")
        out.append('<p class="note">scIB definitions (Luecken et al. 2022) on X_uce, cosine, batch = sample'
                   + (f", on a seeded sample of {_num(cells)} cells" if cells is not None else "")
                   + (f"; computed in {float(secs):.1f} s" if isinstance(secs, (int, float)) else "")
                   + ". label_asw: labels separated (1 = best); batch_asw, ilisi_scaled: samples mixed within "
                   "labels (1 = best); knn_label_consistency: neighbours sharing a cell's label.</p>")
        out.append('<div class="tablewrap"><table><tr><th class="l">Metric</th><th>Value</th></tr>')
        for k, v in metrics.items():
            out.append(f'<tr id="atlas-metric-{esc(k)}"><td class="l">{esc(k)}</td><td>{_num(v)}</td></tr>')
        out.append("</table></div>")
        skipped = s.get("metrics_skipped")
        if isinstance(skipped, dict) and skipped:
            out.append('<p class="note">Not computed: ' + esc("; ".join(f"{k}: {v}" for k, v in skipped.items())) + "</p>")
    else:
        out.append('<p class="note">No integration metrics (they need a label column: <code>--label_column</code>).</p>')

    lt = s.get("label_transfer") if isinstance(s.get("label_transfer"), dict) else None
    out.append("<h3>Label transfer</h3>")
    if not lt:
        out.append('<p class="note">No label transfer: pass <code>--reference_samples</code> and '
                   "<code>--label_column</code> to carry labels from annotated samples to the others.</p>")
        return out
    refs = lt.get("reference_samples") or []
    out.append(f'<p class="note">kNN classifier in UCE space (cosine, k = {esc(lt.get("k", "–"))}) trained on '
               f"<b>{esc(', '.join(map(str, refs)))}</b>"
               + (f" (label column <code>{esc(lt.get('label_column'))}</code>)" if lt.get("label_column") else "")
               + ". Held-out accuracy: a seeded 20% of the reference cells classified by the other 80%. Query "
               "accuracy: where a query sample has the label column (or the query label column), its own "
               "labels against the transferred ones.</p>")
    out.append('<div class="tablewrap"><table><tr><th class="l">Evaluated on</th><th class="l">Truth column</th>'
               "<th>Cells</th><th>Accuracy</th><th>Mean confidence</th></tr>")
    out.append(f'<tr id="atlas-holdout"><td class="l">reference hold-out</td>'
               f'<td class="l">{esc(lt.get("label_column") or "–")}</td>'
               f'<td>{_num(lt.get("n_holdout", lt.get("holdout_n")))}</td>'
               f"<td>{_pct(lt.get('holdout_accuracy'))}</td><td>–</td></tr>")
    queries = lt.get("queries") if isinstance(lt.get("queries"), dict) else {}
    for q, v in queries.items():
        v = v if isinstance(v, dict) else {}
        acc = v.get("accuracy")
        out.append(f'<tr id="atlas-query-{esc(q)}"><td class="l">{esc(q)}</td>'
                   f'<td class="l">{esc(v.get("truth_column") or "–")}</td><td>{_num(v.get("n"))}</td>'
                   f"<td>{_pct(acc) if acc is not None else 'no truth labels'}</td>"
                   f"<td>{_num(v.get('mean_confidence'))}</td></tr>")
    out.append("</table></div>")
    for q, v in queries.items():
        if isinstance(v, dict) and isinstance(v.get("confusion"), dict):
            out += _confusion_table(q, v["confusion"])
    if CONFUSION in atlas.pngs:
        out.append('<div class="cards"><div class="card wide" id="atlas-confusion-png"><h3>Confusion matrix</h3>'
                   + _img(CONFUSION, atlas.pngs[CONFUSION], "label transfer confusion matrix") + "</div></div>")
    return out
