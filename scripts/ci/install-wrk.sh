#!/usr/bin/env bash
# Installs Debian's wrk, the HTTP load generator the README's load-test recipe and the HTTP benchmarks
# use (tests/service/test_readme.py runs the recipe). Idempotent: a no-op when wrk is on PATH.
set -euo pipefail
if command -v wrk >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends wrk >/dev/null
