#!/usr/bin/env bash
# Fresh machine -> demo: installs what is needed (idempotent, cached) and runs the pipeline's
# embedded offline demo (`-profile test`: real pbmc counts, tiny synthetic model) on CPU.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${UCE_NF_CACHE:-$HOME/.cache/uce-nf}
bash "$here/scripts/setup.sh"
export PATH="$cache/venv/bin:$cache/bin:$PATH" PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" NXF_OFFLINE=true
outdir=${1:-$here/results-demo}
cd "$here"
start=$(date +%s)
nextflow run "$here" -profile test --outdir "$outdir" -ansi-log false
echo "[demo] finished in $(( $(date +%s) - start )) s; results in $outdir (report: $outdir/report/uce_report.html)"
