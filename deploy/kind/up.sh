#!/usr/bin/env bash
# Run aqueduct on a laptop: a kind cluster, the image built from this repository and loaded into it,
# the Helm chart, the example Pipeline, and one inference request through a port-forward.
# Idempotent: re-running reuses the cluster, rebuilds and reloads the image, upgrades the release.
#
# Needs: docker, kind, kubectl, helm (3 or 4), curl.
# Settings (environment): KIND_CLUSTER (aqueduct), IMAGE (aqueduct:dev, the tag examples/pipeline.yaml uses),
#   BASE (base image for the build; default the Dockerfile's python:3.11-slim), NAMESPACE (aqueduct-system),
#   RELEASE (aqueduct), LOCAL_PORT (8080), TIMEOUT (300s).
set -euo pipefail

CLUSTER="${KIND_CLUSTER:-aqueduct}"
IMAGE="${IMAGE:-aqueduct:dev}"
BASE="${BASE:-}"
NAMESPACE="${NAMESPACE:-aqueduct-system}"
RELEASE="${RELEASE:-aqueduct}"
LOCAL_PORT="${LOCAL_PORT:-8080}"
TIMEOUT="${TIMEOUT:-300s}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CHART="$ROOT/deploy/helm/aqueduct"
CONTEXT="kind-$CLUSTER"
PIPELINE=catdetector
MODEL=catdetector

step() { printf '\n==> %s\n' "$*"; }
need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    printf 'up.sh: %s is required (%s)\n' "$1" "$2" >&2
    exit 1
  fi
}
need docker "https://docs.docker.com/get-docker/"
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need helm "https://helm.sh/docs/intro/install/"
need curl "your package manager"
kc() { kubectl --context "$CONTEXT" "$@"; }

step "kind cluster '$CLUSTER'"
clusters="$(kind get clusters 2>/dev/null)"
if grep -qx "$CLUSTER" <<<"$clusters"; then
  echo "exists; reusing it"
else
  kind create cluster --name "$CLUSTER" --wait 120s
fi

step "docker build -t $IMAGE ${BASE:+(BASE=$BASE)}"
build_args=()
if [[ -n "$BASE" ]]; then
  build_args+=(--build-arg "BASE=$BASE")
fi
docker build ${build_args[@]+"${build_args[@]}"} -t "$IMAGE" "$ROOT"
image_id="$(docker image inspect --format '{{.Id}}' "$IMAGE")"

step "kind load docker-image $IMAGE"
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "CRD pipelines.aqueduct.dev (kubectl apply: helm installs crds/ only once, never upgrades them)"
kc apply -f "$CHART/crds/pipelines.yaml"

step "helm upgrade --install $RELEASE (namespace $NAMESPACE)"
# The image-id annotation restarts the operator whenever the rebuilt image differs.
helm upgrade --install "$RELEASE" "$CHART" --kube-context "$CONTEXT" \
  --namespace "$NAMESPACE" --create-namespace \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=IfNotPresent \
  --set-string "operator.podAnnotations.aqueduct\.dev/image-id=${image_id#sha256:}" \
  --wait --timeout "$TIMEOUT"

step "kubectl apply -f examples/pipeline.yaml"
kc apply -f "$ROOT/examples/pipeline.yaml"
# Serving pods of an unchanged Pipeline keep an old image of the same tag: restart them after a rebuild.
if kc get deployment "$PIPELINE" >/dev/null 2>&1; then
  kc rollout restart deployment "$PIPELINE"
fi

step "waiting for Pipeline $PIPELINE to be Ready (timeout $TIMEOUT)"
kc wait "pipeline/$PIPELINE" --for=condition=Ready --timeout "$TIMEOUT"
kc rollout status "deployment/$PIPELINE" --timeout "$TIMEOUT"
kc get pipeline "$PIPELINE"

step "port-forward service/$PIPELINE $LOCAL_PORT:8080 and one inference request"
pf_log="$(mktemp)"
# Not through kc(): a backgrounded function is a subshell, and killing it would leave kubectl running.
kubectl --context "$CONTEXT" port-forward "service/$PIPELINE" "$LOCAL_PORT:8080" >"$pf_log" 2>&1 &
pf_pid=$!
trap 'kill "$pf_pid" 2>/dev/null || true; rm -f "$pf_log"' EXIT
url="http://127.0.0.1:$LOCAL_PORT"
for _ in $(seq 1 60); do
  if curl -sf "$url/v2/health/ready" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pf_pid" 2>/dev/null; then
    cat "$pf_log" >&2
    exit 1
  fi
  sleep 0.5
done
request='{"inputs": [{"name": "image", "datatype": "FP32", "shape": [4], "data": [0.1, 0.2, 0.3, 0.4]}]}'
echo "POST $url/v2/models/$MODEL/infer $request"
answer="$(curl -sS -X POST -H 'Content-Type: application/json' -d "$request" -w '\nHTTP %{http_code}' \
  "$url/v2/models/$MODEL/infer")"
echo "answer: ${answer%$'\n'*}"
if [[ "${answer##*$'\n'}" != "HTTP 200" ]]; then
  echo "up.sh: the inference request failed (${answer##*$'\n'})" >&2
  exit 1
fi

cat <<DONE

aqueduct is running in kind cluster '$CLUSTER' (kubectl context $CONTEXT).
  kubectl --context $CONTEXT get pipelines                    # READY True
  kubectl --context $CONTEXT port-forward service/$PIPELINE $LOCAL_PORT:8080
  kubectl --context $CONTEXT edit pipeline $PIPELINE          # e.g. spec.steps[0].batchSize: the pods roll
  deploy/kind/down.sh                                         # delete the cluster
DONE
