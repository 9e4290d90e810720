#!/usr/bin/env bash
# GPU benchmark: ResNet-50 (examples/resnet) in one process (the ceiling), through our pod with 1 and with
# N front ends, and through mosec 0.9.8, on the same GPU; wrk on loopback. See bench/gpu/README.md.
# Usage (from the repository root, on the GPU machine): bench/gpu/run.sh [N front ends, default 8]
set -euo pipefail
cd "$(dirname "$0")/../.."
FRONTENDS=${1:-8}
PY=${AQUEDUCT_PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/gpu-bench}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/service${PYTHONPATH:+:$PYTHONPATH}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "CPUs: $(nproc)"
echo "== the model in one process"
"$PY" bench/gpu/ceiling.py --batches "${BATCHES:-1,8,16,32,64,128}" --json "$OUT/ceiling.json"
echo "== through the pod (batch 64, 2 ms window) and mosec (batch 64, 2 ms wait)"
"$PY" bench/serving/run.py --models resnet --servers "aqueduct-1,aqueduct-$FRONTENDS,${MOSEC:-mosec}" \
  --concurrency "${CONCURRENCY:-1,16,64,256}" --duration "${DURATION:-10}" --warmup 3 \
  --mosec-python "${MOSEC_PYTHON:-$PY}" --json "$OUT/serving.json"
echo "== the pod with two workers on the GPU (one prepares a batch while the other's runs)"
AQUEDUCT_STEPS__CLASSIFY__NPROCS=2 "$PY" bench/serving/run.py --models resnet --servers "aqueduct-$FRONTENDS" \
  --concurrency "${CONCURRENCY:-1,16,64,256}" --duration "${DURATION:-10}" --warmup 3 --json "$OUT/serving-nprocs2.json"
