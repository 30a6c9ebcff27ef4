#!/usr/bin/env bash
# Installs the system tools the tests need when they are missing: Debian's `prometheus` package
# (the real Prometheus server and promtool, for tests/test_monitoring.py). Quiet; a no-op when the
# tools are already there, and it says what is missing instead of failing when we are not root.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "ensure_system_deps: prometheus/promtool missing; install Debian's 'prometheus' package" >&2
  exit 0
fi
echo "ensure_system_deps: installing prometheus (apt-get, first run only)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# The package's postinst would start a system service; none is wanted here, only the binaries.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
fi
trap 'if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi' EXIT
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
