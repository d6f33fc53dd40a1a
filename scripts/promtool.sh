#!/usr/bin/env bash
# scripts/promtool.sh DEST: put Prometheus' promtool (checks and unit-tests the rules in
# ops/prometheus/) at DEST.
#
# It comes from Debian's `prometheus` package, but only the promtool binary is taken out
# of the .deb: installing the package would also enable and start a Prometheus server on
# the machine that runs the tests. A promtool already on PATH is used as it is.
set -euo pipefail
dest=$1
if found=$(command -v promtool); then
    ln -sfn "$found" "$dest"
    exit 0
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
chmod 0777 "$dir"   # apt downloads as the _apt user
# Stale or missing package lists (a machine whose packages were all there already) get
# one `apt-get update`.
(cd "$dir" && apt-get download -qq prometheus 2>/dev/null) ||
    (apt-get update -qq && cd "$dir" && apt-get download -qq prometheus) || {
    echo "promtool: 'apt-get download prometheus' failed: check the Debian mirror in /etc/apt/sources.list*" >&2
    exit 1
}
dpkg-deb --fsys-tarfile "$dir"/prometheus_*.deb | tar -xO ./usr/bin/promtool >"$dest.tmp"
chmod 0755 "$dest.tmp"
mv "$dest.tmp" "$dest"
"$dest" --version | head -1
