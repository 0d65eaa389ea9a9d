#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11, no torch needed beforehand) and run the test suite.
#
#   bash scripts/test.sh                 # everything (what CI runs)
#   bash scripts/test.sh -m "not slow"   # the quick subset: no multi-process torchrun tests
#   COMPAT_MCORE= bash scripts/test.sh   # megatron-core 0.16.1 only
#
# scripts/setup_venv.sh creates .venv/ (torch 2.13.0 CPU first, megatron-core 0.16.1, the package
# with its test and hf extras). The suite runs on megatron-core 0.16.1 there, then again on each
# release in COMPAT_MCORE (default 0.19.2, the newest; scripts/test_compat.sh builds its environment,
# .venv-mcore-<version>/, from a copy of .venv/). The pytest arguments go to every run; the exit status
# is non-zero if any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export OMP_NUM_THREADS=1
versions=${COMPAT_MCORE-0.19.2}
# The compatibility environments are built while the first run goes: copying .venv/, unpacking a wheel
# and downloading triton are mostly I/O (about a minute on 2 cores, saved from the total).
build_log=$(mktemp)
(for version in $versions; do SKIP_SETUP=1 COMPAT_BUILD_ONLY=1 bash scripts/test_compat.sh "$version" || exit 1; done) \
  > "$build_log" 2>&1 &
build_pid=$!
status=0
echo "[test] megatron-core 0.16.1"
.venv/bin/python -m pytest "$@" || status=$?
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
  SKIP_SETUP=1 bash scripts/test_compat.sh "$version" "$@" || status=$?
done
exit "$status"
