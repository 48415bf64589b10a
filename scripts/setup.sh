#!/usr/bin/env bash
# Create .venv with everything maverick-serve and its tests need. Idempotent.
# On the CPU dev machines torch 2.13.0 comes from the local CPU wheel pip is configured with;
# on a GPU host pip takes the CUDA build of the same release.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# redis-server: the KV tier's Redis store; its integration tests start their own on free ports.
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing redis-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "warning: redis-server is missing and this is not root; run: sudo apt-get install -y redis-server" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# torchvision/torchaudio CUDA builds break transformers' Llama 4 modules next to the CPU torch.
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "setup done: $(.venv/bin/python -c 'import torch, maverick_serve; print("torch", torch.__version__, "maverick-serve", maverick_serve.__version__)')"
