#!/usr/bin/env bash
# The whole test suite: installs the real peers the tests use when they are
# missing (Debian packages: systemd for systemd-socket-activate and
# systemd-analyze, prometheus for promtool, haproxy for tests/haproxy.rs,
# chromium for the headless-browser test of the status page,
# tests/status_page.rs), then runs cargo test.
# Tests whose peer could not be installed say SKIPPED loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v systemd-socket-activate >/dev/null 2>&1 || need+=(systemd)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]} (Debian packages the tests use as real peers)"
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
      || echo "*** could not install ${need[*]}: the tests that need them will say SKIPPED"
  else
    echo "*** not root or no apt-get: ${need[*]} not installed; the tests that need them will say SKIPPED"
  fi
fi

cargo test --workspace --release "$@"
# cargo keeps a passing test's output to itself: name the status page's
# screenshots (tests/status_page.rs) here, where CI's log shows them.
for png in target/tmp/status-page*.png; do
  if [ -e "$png" ]; then echo "status page screenshot: $png"; fi
done
