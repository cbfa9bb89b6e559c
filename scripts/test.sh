#!/usr/bin/env bash
# The test command: installs what it needs, then checks generated code, lint,
# types and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== generated protobuf code"
PYTHON=.venv/bin/python bash scripts/gen_protos.sh --check
echo "== ruff"
ruff check .
ruff format --check pki gateway device_sdk edgeward tests bench scripts
echo "== mypy (strict)"
mypy
echo "== pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
