#!/bin/sh
# Checks xps.service and xps.socket with `systemd-analyze verify`, installed
# into a scratch root together with the xps binary (ExecStart= must exist)
# and the distribution's own units (sysinit.target etc. must resolve).
# Fails on any message at all, since systemd-analyze exits 0 on unknown keys
# and bad values (it only warns).
#
#   contrib/systemd/verify.sh [path/to/xps]     (default: target/release/xps)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-$here/../../target/release/xps}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -D -m 755 "$bin" "$root/usr/local/bin/xps"
install -D -m 755 /bin/kill "$root/bin/kill"
install -D -m 644 "$here/xps.service" "$here/xps.socket" -t "$root/etc/systemd/system/"
mkdir -p "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
out=$(systemd-analyze verify --root="$root" xps.socket xps.service 2>&1) || {
    printf '%s\n' "$out"; exit 1; }
if [ -n "$out" ]; then printf '%s\n' "$out"; exit 1; fi
echo "systemd-analyze verify: xps.socket xps.service OK ($(systemd-analyze --version | head -1))"
systemd-analyze security --offline=yes --root="$root" xps.service 2>/dev/null | tail -1
