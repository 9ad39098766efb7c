#!/usr/bin/env bash
# One-command GPU check (at most ~8 minutes on one H100/H200): bash tools/gpu_check.sh OUT_DIR [gpu_check.py flags]
#
# Writes OUT_DIR/gpu_check.md, OUT_DIR/gpu_check.json and OUT_DIR/gpu_check_logs.txt; exits non-zero when a step
# FAILs. All logic is in tools/gpu_check.py (its docstring lists the steps, criteria and the time estimate).
#
# Where megatron-core comes from:
#   - a GPU node with the project installed (pip install -e .[gpu]): nothing to do, it is imported as installed;
#   - a machine without internet and without megatron-core (e.g. a lent single-GPU box with Python 3.12,
#     torch + CUDA, transformers): run `bash tools/gpu_wheels.sh` on a machine with internet first. It fills .whl/
#     with `pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform
#     manylinux_2_28_x86_64 ... megatron-core==0.16.1 packaging==25.0` (kiwipiepy, zstandard and
#     transformer-engine are left out on purpose; gpu_wheels.sh says why). Carry .whl/ to the GPU machine next to
#     the working tree; this script installs every wheel in it into a private target directory with
#     `pip install --no-index --no-deps --target` and puts that directory and the repository on PYTHONPATH (no
#     pip install -e, no console scripts needed: the check calls `python3 -m ...`).
#
# Environment: PYTHON (default python3), HCX_WHEELS (default REPO/.whl), HCX_SITE (install target, default
# /tmp/hcx_gpu_check_site), HCX_FORCE_WHEELS=1 installs the wheels even when megatron-core already imports.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bash tools/gpu_check.sh OUT_DIR [tools/gpu_check.py flags, e.g. --steps 2,3]" >&2
    exit 2
fi
OUT="$1"
shift

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${HCX_WHEELS:-$REPO/.whl}"
SITE="${HCX_SITE:-/tmp/hcx_gpu_check_site}"

# find_spec, not an import: importing megatron-core costs seconds, and step 1 imports it anyway.
have_megatron() {
    "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('megatron.core') is None)" 2> /dev/null
}
if [[ "${HCX_FORCE_WHEELS:-0}" == 1 ]] || ! have_megatron; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if [[ ${#wheels[@]} -eq 0 ]]; then
        echo "gpu_check: megatron-core does not import with $PYTHON and $WHEELS holds no wheels." >&2
        echo "  run 'bash tools/gpu_wheels.sh' where there is internet and carry .whl/, or 'pip install -e .[gpu]'." >&2
        exit 2
    fi
    echo "gpu_check: installing ${#wheels[@]} wheels from $WHEELS into $SITE"
    start=$SECONDS
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}"
    echo "gpu_check: installed in $((SECONDS - start)) s"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

mkdir -p "$OUT"
exec "$PYTHON" "$REPO/tools/gpu_check.py" --out "$OUT" "$@"
