#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11, no torch needed beforehand) and run the test suite.
#
#   bash scripts/test.sh                 # everything (what CI runs)
#   bash scripts/test.sh -m "not slow"   # the quick subset: no multi-process torchrun tests
#   COMPAT_MCORE= bash scripts/test.sh   # megatron-core 0.16.1 only
#   VLLM_TESTS= bash scripts/test.sh     # without the vLLM stage
#
# scripts/setup_venv.sh creates .venv/ (torch 2.13.0 CPU first, megatron-core 0.16.1, the package
# with its test and hf extras). The suite runs on megatron-core 0.16.1 there, then again on each
# release in COMPAT_MCORE (default 0.19.2, the newest; scripts/test_compat.sh builds its environment,
# .venv-mcore-<version>/, from a copy of .venv/). Then the tests marked `vllm` run once, as their own stage,
# against a real vLLM server from .venv-vllm/ (scripts/setup_vllm.sh builds it, in the background while
# the first run goes; a missing environment fails them). The pytest arguments go to every run, with
# `-m "not vllm"` merged into the user's -m for the Megatron runs and `-m vllm` for the vLLM stage; the
# exit status is non-zero if any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export OMP_NUM_THREADS=1
versions=${COMPAT_MCORE-0.19.2}
vllm_stage=${VLLM_TESTS-1}
# The user's pytest arguments with a marker expression merged in: -m EXPR / -mEXPR / -m=EXPR become
# -m "(EXPR) and $1"; without -m, -m "$1" is appended.
with_marker() {
  local extra=$1 found=0 out=() prev=""
  shift
  for arg in "$@"; do
    if [ "$prev" = "-m" ]; then out+=("($arg) and $extra"); found=1; prev=""; continue; fi
    case "$arg" in
      -m) out+=("$arg"); prev="-m" ;;
      -m=*) out+=("-m" "(${arg#-m=}) and $extra"); found=1 ;;
      -m*) out+=("-m" "(${arg#-m}) and $extra"); found=1 ;;
      *) out+=("$arg") ;;
    esac
  done
  [ "$found" = 1 ] || out+=("-m" "$extra")
  printf '%s\0' "${out[@]}"
}
mapfile -d '' megatron_args < <(with_marker "not vllm" "$@")
mapfile -d '' vllm_args < <(with_marker "vllm" "$@")
vllm_log=$(mktemp)
vllm_pid=""
if [ -n "$vllm_stage" ]; then
  bash scripts/setup_vllm.sh > "$vllm_log" 2>&1 &
  vllm_pid=$!
fi
# The compatibility environments are built while the first run goes: copying .venv/, unpacking a wheel
# and downloading triton are mostly I/O (about a minute on 2 cores, saved from the total).
build_log=$(mktemp)
(for version in $versions; do SKIP_SETUP=1 COMPAT_BUILD_ONLY=1 bash scripts/test_compat.sh "$version" || exit 1; done) \
  > "$build_log" 2>&1 &
build_pid=$!
status=0
echo "[test] megatron-core 0.16.1"
.venv/bin/python -m pytest "${megatron_args[@]}" || status=$?
build_status=0
wait "$build_pid" || build_status=$?
cat "$build_log"
rm -f "$build_log"
if [ "$build_status" -ne 0 ]; then
  echo "[test] building the compatibility environments failed (exit $build_status)" >&2
  exit 1
fi
for version in $versions; do
  echo "[test] megatron-core $version (scripts/test_compat.sh)"
  SKIP_SETUP=1 bash scripts/test_compat.sh "$version" "${megatron_args[@]}" || status=$?
done
if [ -n "$vllm_pid" ]; then
  echo "[test] vLLM (.venv-vllm, scripts/setup_vllm.sh)"
  vllm_build=0
  wait "$vllm_pid" || vllm_build=$?
  cat "$vllm_log"
  if [ "$vllm_build" -ne 0 ]; then
    echo "[test] building .venv-vllm failed (exit $vllm_build)" >&2
    status=1
  else
    vllm_status=0
    MEGATRON_RL_AGG_REQUIRE_VLLM=1 .venv/bin/python -m pytest "${vllm_args[@]}" || vllm_status=$?
    # 5: no test selected (e.g. -m "not slow": the vLLM tests are slow too)
    if [ "$vllm_status" -ne 0 ] && [ "$vllm_status" -ne 5 ]; then status=$vllm_status; fi
  fi
fi
rm -f "$vllm_log"
exit "$status"
