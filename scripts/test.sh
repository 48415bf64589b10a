#!/usr/bin/env bash
# The test command of the README: unit, integration, e2e and helm tiers; GPU tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q "$@"
