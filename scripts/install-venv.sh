#!/usr/bin/env bash
# Install a main lock into a venv: exactly the lock's pins (hash-checked; anything else removed),
# then maverick-serve itself without dependencies or build isolation (its build backend is in
# the lock), then `uv pip check`. Used by setup.sh (editable, in .venv) and the Dockerfiles.
#   scripts/install-venv.sh VENV cpu|cuda [--editable]
set -euo pipefail
# shellcheck source=lib/locks.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/locks.sh"
venv="${1:?usage: install-venv.sh VENV cpu|cuda [--editable]}"
flavour="${2:?usage: install-venv.sh VENV cpu|cuda [--editable]}"
editable="${3:-}"
lock="$LOCKS_DIR/main-$flavour.txt"
[ -f "$lock" ] || { echo "install-venv: no lock $lock (flavour must be cpu or cuda)" >&2; exit 2; }
UV="$(ensure_uv)"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv with ${PYTHON:-python3}"
  "$UV" venv -q --python "${PYTHON:-python3}" "$venv"
fi
find_links=()
if [ "$flavour" = cpu ]; then
  if ! ls "$TORCH_FIND_LINKS" >/dev/null 2>&1 && [[ "$TORCH_FIND_LINKS" != http* ]]; then
    echo "install-venv: TORCH_FIND_LINKS=$TORCH_FIND_LINKS holds no torch-$TORCH_VERSION+cpu wheel; put the" \
      "wheel whose hash locks/main-cpu.txt lists there, or point TORCH_FIND_LINKS at PyTorch's CPU index" >&2
    exit 1
  fi
  find_links=(--find-links "$TORCH_FIND_LINKS")
fi
echo "installing $(basename "$lock") into $venv"
"$UV" pip sync -q --python "$venv/bin/python" --require-hashes "${find_links[@]}" "$lock"
if [ "$editable" = --editable ]; then
  "$UV" pip install -q --python "$venv/bin/python" --no-deps --no-build-isolation -e "$REPO_ROOT"
else
  "$UV" pip install -q --python "$venv/bin/python" --no-deps --no-build-isolation "$REPO_ROOT"
fi
"$UV" pip check -q --python "$venv/bin/python"
