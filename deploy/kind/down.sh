#!/usr/bin/env bash
# Delete the kind cluster deploy/kind/up.sh created (and everything in it). Idempotent.
# Settings (environment): KIND_CLUSTER (aqueduct).
set -euo pipefail

CLUSTER="${KIND_CLUSTER:-aqueduct}"

if ! command -v kind >/dev/null 2>&1; then
  echo "down.sh: kind is required (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)" >&2
  exit 1
fi

clusters="$(kind get clusters 2>/dev/null)"
if grep -qx "$CLUSTER" <<<"$clusters"; then
  echo "==> kind delete cluster --name $CLUSTER"
  kind delete cluster --name "$CLUSTER"
else
  echo "==> no kind cluster '$CLUSTER'; nothing to do"
fi
