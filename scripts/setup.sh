#!/usr/bin/env bash
# Installs everything the pipeline and its tests need, idempotently, into a cache folder:
#   - a Python venv with the pinned runtime and test dependencies (the package runs from src/);
#   - Nextflow 24.10.x resolved from Maven Central (scripts/install_nextflow.sh).
# Prints the lines to source for PATH. Safe to run again: finished steps are skipped.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${UCE_NF_CACHE:-$HOME/.cache/uce-nf}
venv=$cache/venv
mkdir -p "$cache"

stamp=$venv/.requirements.sha256
want=$(cat "$here/envs/requirements.txt" "$here/envs/requirements-test.txt" | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] creating venv in $venv (pip cache keeps re-runs fast)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$here/envs/requirements-test.txt"
  echo "$want" > "$stamp"
fi
# The package itself is NOT installed into the shared venv: several checkouts (and CI's clean
# clone) share it, so each run uses its own source through PYTHONPATH=<checkout>/src, and the
# bin/uce-* wrappers fall back to ../src. Remove an install left by an older set-up.
if "$venv/bin/python" -m pip show -q uce-nf >/dev/null 2>&1; then
  "$venv/bin/python" -m pip uninstall -q -y uce-nf
fi

bash "$here/scripts/install_nextflow.sh" >/dev/null

# `uce` on PATH (the README's commands): a launcher next to the nextflow one that runs this
# checkout's src/ with the venv's Python. A PYTHONPATH set by the caller (another checkout) comes
# first, so the shared cache never pins one checkout over another.
mkdir -p "$cache/bin"  # a user's own nextflow on PATH means install_nextflow.sh made none
cat > "$cache/bin/uce.tmp" <<LAUNCHER
#!/usr/bin/env bash
# Written by $here/scripts/setup.sh: the uce command of that checkout, with the venv's Python.
if [ ! -d "$here/src/uce_nf" ]; then
    echo "uce: $here/src/uce_nf not found (checkout moved or removed); run scripts/setup.sh from your checkout" >&2
    exit 2
fi
export PYTHONPATH="\${PYTHONPATH:+\$PYTHONPATH:}$here/src"
exec "$venv/bin/python" -c 'import sys; from uce_nf.cli import main; sys.exit(main(prog_name="uce"))' "\$@"
LAUNCHER
chmod +x "$cache/bin/uce.tmp"
mv -f "$cache/bin/uce.tmp" "$cache/bin/uce"

# The one line that puts uce, nextflow and the venv's python3 (which the pipeline's bin/uce-*
# tasks run with) on PATH; also saved as env.sh, to `source` in later shells.
line="export PATH=$venv/bin:$cache/bin:\$PATH PYTHONPATH=$here/src"
echo "$line" > "$cache/env.sh"
echo "[setup] done. To use uce and nextflow in this shell, run:"
echo "$line"
echo "[setup] (or, in any later shell: source $cache/env.sh)"
