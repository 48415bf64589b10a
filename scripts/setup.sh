#!/usr/bin/env bash
# Create .venv with exactly what locks/ pins (hash-checked), plus the project itself (editable).
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
flavour="$(main_lock_flavour)"
lock="$LOCKS_DIR/main-$flavour.txt"
UV="$(ensure_uv)"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$UV" venv -q --python "$PYTHON" .venv
fi
find_links=()
if [ "$flavour" = cpu ]; then
  if ! ls "$TORCH_FIND_LINKS"/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
    echo "setup: no torch-$TORCH_VERSION+cpu wheel in $TORCH_FIND_LINKS; put the wheel whose hash" \
      "locks/main-cpu.txt lists there (or set TORCH_FIND_LINKS), or use MAVERICK_TORCH=cuda" >&2
    exit 1
  fi
  find_links=(--find-links "$TORCH_FIND_LINKS")
fi
echo "installing $(realpath --relative-to=. "$lock") into .venv"
"$UV" pip sync -q --python .venv/bin/python --require-hashes "${find_links[@]}" "$lock"
"$UV" pip install -q --python .venv/bin/python --no-deps --no-build-isolation -e .
"$UV" pip check -q --python .venv/bin/python
echo "setup done: $(.venv/bin/python -c 'import torch, maverick_serve; print("torch", torch.__version__, "maverick-serve", maverick_serve.__version__)')"
