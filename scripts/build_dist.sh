#!/usr/bin/env bash
# The release artefacts: sdist and wheel of `edgeward` (the code) and of `edgeward-models`
# (the ONNX models of models/, data only), written to OUTDIR (default dist/).
#   bash scripts/build_dist.sh [OUTDIR]        # PYTHON=... picks the interpreter
# Each wheel is built from its sdist (python -m build), so a file missing from an sdist
# fails here, not on a user's machine. The Docker image is built with this script.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
py=${PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
if ! "$py" -c "import build" 2>/dev/null; then
  echo "build_dist: $py has no 'build' module: pip install build (the dev extra has it)" >&2
  exit 1
fi
mkdir -p "$out"
"$py" -m build --outdir "$out" .
"$py" -m build --outdir "$out" models
ls -l "$out"
