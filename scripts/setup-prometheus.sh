#!/usr/bin/env bash
# Put promtool and prometheus (2.42, Debian 12's package) into .cache/tools/bin: promtool for the
# alert-rule tests (tests/unit/test_ops_prometheus.py), the server for the e2e test that scrapes a
# running app, evaluates the rules and runs every dashboard query (tests/e2e/test_observability.py).
# The package is downloaded, checked against a pinned SHA-256 and only unpacked: nothing is
# installed system-wide and no service starts. Idempotent.
set -euo pipefail
# shellcheck source=lib/locks.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/locks.sh"
VERSION="2.42.0+ds-5+deb12u1"
SHA256="81d59a24fce84f7fbe97a45a4f2914b6a5881b5cd1db2a6a0e129e515e1a5f55"
BIN="$REPO_ROOT/.cache/tools/bin"
if [ -x "$BIN/promtool" ] && [ -x "$BIN/prometheus" ] \
  && [ "$(cat "$BIN/.prometheus-version" 2>/dev/null)" = "$VERSION" ]; then
  echo "setup-prometheus: promtool and prometheus $VERSION already in $BIN"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download -q "prometheus=$VERSION" >/dev/null 2>&1; then
  # A fresh machine has no package lists yet.
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; fi
  apt-get download -q "prometheus=$VERSION" >/dev/null
fi
deb="$(ls prometheus_*.deb)"
echo "$SHA256  $deb" | sha256sum -c --quiet - || {
  echo "setup-prometheus: $deb does not match the pinned SHA-256; refusing it" >&2
  exit 1
}
dpkg-deb -x "$deb" unpacked
mkdir -p "$BIN"
install -m 0755 unpacked/usr/bin/promtool "$BIN/promtool"
install -m 0755 unpacked/usr/bin/prometheus "$BIN/prometheus"
echo "$VERSION" > "$BIN/.prometheus-version"
echo "setup-prometheus: $("$BIN/prometheus" --version 2>&1 | head -1) and promtool in $BIN"
