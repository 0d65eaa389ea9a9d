#!/usr/bin/env bash
# Create or update the test environment .venv/ (Python 3.11; no torch needed beforehand):
#
#   bash scripts/setup_venv.sh
#
# torch is installed first, pinned to the 2.13.0 CPU build, so that no later requirement lets pip
# resolve a CUDA build of torch; then megatron-core 0.16.1 and this package, editable, with the test
# and hf extras. scripts/test.sh runs it before the suite; scripts/test_compat.sh starts each other
# release's environment from a copy of this one, so the two differ in megatron-core alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON_BIN" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check megatron-core==0.16.1 -e ".[test,hf]"
