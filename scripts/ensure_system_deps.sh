#!/usr/bin/env bash
# Installs the system tools the tests need when they are missing: Debian's `prometheus` package
# (the real Prometheus server and promtool, for tests/deploy/test_monitoring.py) and `chromium` with
# `chromium-driver` (a real headless browser, for tests/retrieval_web/test_browser.py). Quiet; a
# no-op when the tools are already there, and it says what is missing instead of failing when we
# are not root.
set -euo pipefail
missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "ensure_system_deps: missing Debian packages: ${missing[*]}" >&2
  exit 0
fi
echo "ensure_system_deps: installing ${missing[*]} (apt-get, first run only)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# The package's postinst would start a system service; none is wanted here, only the binaries.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
fi
trap 'if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
