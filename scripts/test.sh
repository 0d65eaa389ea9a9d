#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11, no torch needed beforehand) and run the test suite.
#
#   bash scripts/test.sh                 # everything (what CI runs)
#   bash scripts/test.sh -m "not slow"   # the quick subset: no multi-process torchrun tests
#
# torch is installed first, pinned to the 2.13.0 CPU build, so that no later requirement lets pip
# resolve a CUDA build of torch. megatron-core is pinned to 0.16.1 for CI (setup.py allows a range).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON_BIN" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check megatron-core==0.16.1 -e ".[test,hf]"
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest "$@"
