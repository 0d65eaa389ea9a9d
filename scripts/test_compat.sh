#!/usr/bin/env bash
# Run the test suite against another megatron-core release, in a separate environment.
#
#   bash scripts/test_compat.sh 0.19.2                  # the whole suite on megatron-core 0.19.2
#   bash scripts/test_compat.sh 0.19.2 -m "not slow"    # the quick subset (pytest arguments follow)
#   bash scripts/test_compat.sh 0.13.0 tests/test_megatron_contract.py
#
# The environment is .venv-mcore-<version>/ (ignored by git), built once and reused while setup.py,
# this script and the extras of scripts/test.sh are unchanged:
#   1. a venv with torch==2.13.0 (CPU build) installed first, so no later step can resolve a CUDA torch;
#   2. megatron-core <version>:
#      - a normal install when the release publishes a wheel for this Python;
#      - otherwise (0.17 and later declare Python >= 3.12) the release's wheel for $MCORE_WHEEL_PYTHON
#        (default 3.12) is fetched with `pip download --no-deps --only-binary=:all:` (cached in
#        .venv-mcore-<version>/wheels/) and unpacked into .venv-mcore-<version>/unpacked/, which goes
#        first on PYTHONPATH. Its .dist-info is unpacked too, so pip and importlib.metadata see
#        megatron-core <version> as installed. Every Python file of 0.17-0.19 compiles on 3.11; the one
#        compiled module (the dataset index helpers) is not used by this package. 0.19 imports triton
#        at import time, so triton (whose wheel imports without a GPU) is installed as well;
#   3. this package, editable, with the extras scripts/test.sh installs (read from its install line),
#      under a constraints file pinning torch==2.13.0 and megatron-core==<version>: the resolver can
#      neither change torch nor replace the megatron-core of step 2.
# Then `python -m pytest <pytest args>` runs with PYTHONPATH exported, so every torchrun worker the
# tests start (tests/torchrun_utils.py prepends the repository root and keeps the rest) imports the
# same megatron-core. NO_VCS_VERSION=1 keeps megatron-core from appending a git hash to its version
# when the unpacked copy sits inside a git checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ ! "$1" =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?([a-z0-9.]*)?$ ]]; then
  echo "usage: bash scripts/test_compat.sh <megatron-core version, e.g. 0.19.2> [pytest args]" >&2
  exit 2
fi
MCORE=$1
shift
PYTHON_BIN=${PYTHON:-python3.11}
WHEEL_PYTHON=${MCORE_WHEEL_PYTHON:-3.12}
TORCH_PIN=torch==2.13.0
TRITON_PIN=triton==3.9.0
# One place for the extras: the package install line of scripts/test.sh.
EXTRAS=$(sed -n 's/.*pip install .* -e "\.\[\([^]]*\)\]".*/\1/p' scripts/test.sh | head -n 1)
if [ -z "$EXTRAS" ]; then
  echo "test_compat.sh: could not read the extras from the '-e \".[...]\"' install line of scripts/test.sh" >&2
  exit 2
fi
VENV=.venv-mcore-$MCORE
PY=$VENV/bin/python
PIP=("$PY" -m pip install -q --disable-pip-version-check)
STAMP=$VENV/.ready
WANT=$(cat setup.py scripts/test_compat.sh | sha256sum | cut -c1-16)-$EXTRAS-$WHEEL_PYTHON

if [ ! -x "$PY" ]; then
  "$PYTHON_BIN" -m venv "$VENV"
fi
UNPACKED=$PWD/$VENV/unpacked
use_unpacked() {  # put the unpacked release first on PYTHONPATH (once)
  case ":${PYTHONPATH:-}:" in
    *":$UNPACKED:"*) ;;
    *) export PYTHONPATH=$UNPACKED${PYTHONPATH:+:$PYTHONPATH} ;;
  esac
}
if [ -d "$UNPACKED" ]; then
  use_unpacked
fi
export NO_VCS_VERSION=1
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  rm -f "$STAMP"
  printf '%s\n%s\n%s\n' "$TORCH_PIN" "megatron-core==$MCORE" "$TRITON_PIN" > "$VENV/constraints.txt"
  "${PIP[@]}" "$TORCH_PIN"
  mkdir -p "$VENV/wheels"
  if [ ! -d "$VENV/unpacked" ] && "$PY" -m pip download -q --disable-pip-version-check --no-deps \
      --only-binary=:all: -d "$VENV/wheels/native" "megatron-core==$MCORE" 2>/dev/null; then
    echo "[test_compat] megatron-core $MCORE: a wheel for this Python exists; normal install"
    "${PIP[@]}" -c "$VENV/constraints.txt" "megatron-core==$MCORE"
  else
    echo "[test_compat] megatron-core $MCORE: no wheel for this Python; unpacking the Python $WHEEL_PYTHON wheel"
    whl=$(ls "$VENV"/wheels/megatron_core-"$MCORE"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$whl" ]; then
      "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$WHEEL_PYTHON" -d "$VENV/wheels" "megatron-core==$MCORE"
      whl=$(ls "$VENV"/wheels/megatron_core-"$MCORE"-*.whl | head -n 1)
    fi
    rm -rf "$VENV/unpacked.tmp"
    "$PY" -m zipfile -e "$whl" "$VENV/unpacked.tmp"
    rm -rf "$VENV/unpacked"
    mv "$VENV/unpacked.tmp" "$VENV/unpacked"
    use_unpacked
    "${PIP[@]}" -c "$VENV/constraints.txt" "$TRITON_PIN"
  fi
  "${PIP[@]}" -c "$VENV/constraints.txt" -e ".[$EXTRAS]"
  echo "$WANT" > "$STAMP"
fi
got=$("$PY" -W ignore -c "import megatron.core, torch; print(megatron.core.__version__, torch.__version__)")
echo "[test_compat] megatron-core ${got% *} (${PYTHONPATH:+PYTHONPATH=$PYTHONPATH, }torch ${got#* })"
if [ "${got% *}" != "$MCORE" ]; then
  echo "test_compat.sh: the environment imports megatron-core ${got% *}, not $MCORE" >&2
  exit 1
fi
export OMP_NUM_THREADS=1
exec "$PY" -m pytest "$@"
