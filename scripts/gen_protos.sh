#!/usr/bin/env bash
# Regenerates the committed Python code for protos/edgeward/v1/*.proto.
# With --check, fails when the committed code differs from a fresh generation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PATH="$(dirname "$(command -v "$PY")"):$PATH"
out=protos/edgeward/v1
if [[ "${1:-}" == "--check" ]]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  "$PY" -m grpc_tools.protoc -I . --python_out="$tmp" --grpc_python_out="$tmp" --mypy_out="$tmp" --mypy_grpc_out="$tmp" $out/*.proto
  for f in "$tmp"/$out/*.py "$tmp"/$out/*.pyi; do
    if ! cmp -s "$f" "$out/$(basename "$f")"; then
      echo "stale generated code: $out/$(basename "$f"); run scripts/gen_protos.sh" >&2
      exit 1
    fi
  done
  echo "generated protobuf code is current"
  exit 0
fi
"$PY" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $out/*.proto
