#!/usr/bin/env bash
# Installs Debian's prometheus package (prometheus + promtool), which tests/monitoring needs: a real
# Prometheus scraping real serving pods, and promtool checking and unit-testing the alert rules.
# Idempotent: a no-op (well under a second) when promtool and prometheus are already on PATH.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d may refuse to start the packaged service: fine, the tests start their own Prometheus.
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
prometheus --version 2>&1 | head -1
