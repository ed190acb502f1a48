#!/usr/bin/env bash
# Device check for a lent GPU machine: one command, needs only this repository (and, where uce-model is
# not installed, its wheel in bench/.wheels: pip download uce-model==0.1.4 --no-deps -d bench/.wheels).
#   bash bench/gpu_check.sh [--out DIR] [--layers 4,33]     # on the GPU machine, ~minutes
#   bash bench/gpu_check.sh --cpu-smoke --out /tmp/smoke     # anywhere: proves it end to end
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi -L || true
exec "$py" "$here/bench/gpu_check.py" "$@"
