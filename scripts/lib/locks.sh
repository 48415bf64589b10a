# Shared by setup.sh, setup-vllm-cpu.sh and update-locks.sh (sourced, not run): where the locks
# live, what they target, and the hash-checked bootstrap of uv, which installs every lock.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LOCKS_DIR="${MAVERICK_LOCKS_DIR:-$REPO_ROOT/locks}"
# The torch release every lock pins: the CPU build (a local wheel on the dev machines) or the
# CUDA build from PyPI. Change it here and run scripts/update-locks.sh.
TORCH_VERSION="2.13.0"
# Where the CPU torch wheel lies on the dev machines; on another CPU machine put
# torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl (the hash in locks/main-cpu.txt) in a
# folder and point TORCH_FIND_LINKS at it.
TORCH_FIND_LINKS="${TORCH_FIND_LINKS:-/opt/wheels}"
# What the locks are resolved for: the dev machines, CI and the H100/H200 nodes.
LOCK_PYTHON_VERSION="3.11"
LOCK_PLATFORM="x86_64-manylinux_2_28"
UV_VENV="$REPO_ROOT/.venv-uv"
# uv must never fetch an interpreter of its own: there is no internet beyond the registries.
export UV_PYTHON_DOWNLOADS=never

# Which main lock this machine takes: MAVERICK_TORCH=cpu|cuda, else cuda where nvidia-smi runs.
main_lock_flavour() {
  case "${MAVERICK_TORCH:-auto}" in
    cpu | cuda) echo "$MAVERICK_TORCH" ;;
    auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo cuda; else echo cpu; fi ;;
    *) echo "MAVERICK_TORCH must be cpu, cuda or auto, not '$MAVERICK_TORCH'" >&2; return 2 ;;
  esac
}

# Install uv from locks/uv.txt (pinned, hash-checked by pip) into .venv-uv; print its path.
ensure_uv() {
  local base_python="${PYTHON:-python3}" want have
  want="$(sed -n 's/^uv==\([^ ]*\).*/\1/p' "$LOCKS_DIR/uv.txt")"
  have="$("$UV_VENV/bin/uv" --version 2>/dev/null | awk '{print $2}')" || true
  if [ "$have" != "$want" ]; then
    [ -x "$UV_VENV/bin/python" ] || "$base_python" -m venv "$UV_VENV" >&2
    "$UV_VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes --no-deps \
      -r "$LOCKS_DIR/uv.txt" >&2
  fi
  echo "$UV_VENV/bin/uv"
}
