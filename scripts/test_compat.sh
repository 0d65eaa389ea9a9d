#!/usr/bin/env bash
# Run the test suite against another megatron-core release, in a separate environment.
#
#   bash scripts/test_compat.sh 0.19.2                  # the whole suite on megatron-core 0.19.2
#   bash scripts/test_compat.sh 0.19.2 -m "not slow"    # the quick subset (pytest arguments follow)
#   bash scripts/test_compat.sh 0.13.0 tests/megatron/test_megatron_contract.py
#
# The environment is .venv-mcore-<version>/ (ignored by git), built once and reused while setup.py,
# this script, scripts/setup_venv.sh and the packages of .venv/ are unchanged:
#   1. a copy of the main test environment .venv/ (scripts/setup_venv.sh creates or updates it first:
#      torch 2.13.0 CPU, the package and its test / hf extras), with its megatron-core 0.16.1
#      uninstalled, so the two environments differ in megatron-core alone;
#   2. megatron-core <version>:
#      - a normal install when the release publishes a wheel for this Python (under a constraints file
#        pinning torch==2.13.0: the resolver cannot change torch);
#      - otherwise (0.17 and later declare Python >= 3.12) the release's wheel for $MCORE_WHEEL_PYTHON
#        (default 3.12) is fetched with `pip download --no-deps --only-binary=:all:` (cached in
#        .venv-mcore-wheels/) and unpacked into .venv-mcore-<version>/unpacked/, which goes first on
#        PYTHONPATH, and compiled to bytecode (pip does that for an install; without it every process
#        would compile Megatron again where PYTHONDONTWRITEBYTECODE is set). Its .dist-info is unpacked
#        too, so pip and importlib.metadata see megatron-core <version> as installed. Every Python file
#        of 0.17-0.19 compiles on 3.11; the one compiled module (the dataset index helpers) is not used
#        by this package. 0.19 imports triton at import time, so triton (whose wheel imports without a
#        GPU) is installed as well;
#   3. this package reinstalled editable without dependencies, so its console script runs this
#      environment's Python.
# SKIP_SETUP=1 leaves .venv/ as it is (scripts/test.sh has just set it up); COMPAT_BUILD_ONLY=1 stops
# once the environment is ready. Then `python -m pytest <pytest args>` runs with PYTHONPATH exported, so
# every torchrun worker the tests start (tests/torchrun_utils.py prepends the repository root and keeps the rest) imports the
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
WHEEL_PYTHON=${MCORE_WHEEL_PYTHON:-3.12}
TORCH_PIN=torch==2.13.0
TRITON_PIN=triton==3.9.0
VENV=.venv-mcore-$MCORE
WHEELS=.venv-mcore-wheels
PY=$VENV/bin/python
PIP=("$PY" -m pip install -q --disable-pip-version-check)
STAMP=$VENV/.ready
UNPACKED=$PWD/$VENV/unpacked

if [ -z "${SKIP_SETUP:-}" ]; then
  bash scripts/setup_venv.sh
fi
WANT=$( (cat setup.py scripts/test_compat.sh scripts/setup_venv.sh; echo "$WHEEL_PYTHON";
         .venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check) | sha256sum | cut -c1-16)
export NO_VCS_VERSION=1
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[test_compat] building $VENV from a copy of .venv"
  rm -rf "$VENV"
  cp -a .venv "$VENV"
  "$PY" -m pip uninstall -q -y --disable-pip-version-check megatron-core
  printf '%s\n%s\n%s\n' "$TORCH_PIN" "megatron-core==$MCORE" "$TRITON_PIN" > "$VENV/constraints.txt"
  mkdir -p "$WHEELS/native"
  if "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      -d "$WHEELS/native" "megatron-core==$MCORE" 2>/dev/null; then
    echo "[test_compat] megatron-core $MCORE: a wheel for this Python exists; normal install"
    "${PIP[@]}" -c "$VENV/constraints.txt" --no-index --find-links "$WHEELS/native" "megatron-core==$MCORE"
  else
    echo "[test_compat] megatron-core $MCORE: no wheel for this Python; unpacking the Python $WHEEL_PYTHON wheel"
    whl=$(ls "$WHEELS"/megatron_core-"$MCORE"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$whl" ]; then
      "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$WHEEL_PYTHON" -d "$WHEELS" "megatron-core==$MCORE"
      whl=$(ls "$WHEELS"/megatron_core-"$MCORE"-*.whl | head -n 1)
    fi
    "$PY" -m zipfile -e "$whl" "$UNPACKED"
    "$PY" -m compileall -q "$UNPACKED" > /dev/null
    "${PIP[@]}" -c "$VENV/constraints.txt" "$TRITON_PIN"
  fi
  "${PIP[@]}" --no-deps -e .
  echo "$WANT" > "$STAMP"
fi
if [ -d "$UNPACKED" ]; then
  case ":${PYTHONPATH:-}:" in
    *":$UNPACKED:"*) ;;
    *) export PYTHONPATH=$UNPACKED${PYTHONPATH:+:$PYTHONPATH} ;;
  esac
fi
if [ -n "${COMPAT_BUILD_ONLY:-}" ]; then
  echo "[test_compat] $VENV is ready"
  exit 0
fi
got=$("$PY" -W ignore -c "import megatron.core, torch; print(megatron.core.__version__, torch.__version__)")
echo "[test_compat] megatron-core ${got% *} (${PYTHONPATH:+PYTHONPATH=$PYTHONPATH, }torch ${got#* })"
if [ "${got% *}" != "$MCORE" ]; then
  echo "test_compat.sh: the environment imports megatron-core ${got% *}, not $MCORE" >&2
  exit 1
fi
export OMP_NUM_THREADS=1
exec "$PY" -m pytest "$@"
