#!/usr/bin/env bash
# Fresh machine -> all tests: installs what is needed (venv, Nextflow, podman + the image;
# idempotent, cached) and runs the whole pytest suite. Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${UCE_NF_CACHE:-$HOME/.cache/uce-nf}
bash "$here/scripts/setup.sh"
if [ "${CI:-}" = true ]; then
  export UCE_NF_REQUIRE_PODMAN=1  # CI on this machine kind must run the container tests, not skip them
  bash "$here/scripts/setup_podman.sh"
else
  bash "$here/scripts/setup_podman.sh" || echo "[test] podman set-up failed: container tests will say why they skip"
fi
export PATH="$cache/venv/bin:$cache/bin:$PATH" PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" NXF_OFFLINE=true
cd "$here"
start=$(date +%s)
python -m pytest -ra "$@"
echo "[test] suite finished in $(( $(date +%s) - start )) s"
