#!/usr/bin/env bash
# Everything the GPU figures need, in one run on a GPU machine that reaches no registry (the device
# tool): wheels from .whl/ (bench/gpu/README.md lists them), wrk from .whl/deb/ (Debian's .deb files),
# then bench/gpu/runtimes.py (the built-in runtimes against their libraries in process) and
# bench/gpu/run.sh (ResNet-50: in process, through the pod with 1 and N front ends, mosec, two workers).
# Output goes to $OUT (default /tmp/gpu-bench). Usage: bench/gpu/on-device.sh [N front ends, default 8]
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/gpu-bench}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
mkdir -p /tmp/wrk && for f in .whl/deb/*.deb; do dpkg -x "$f" /tmp/wrk; done
export WRK=/tmp/wrk/usr/bin/wrk LD_LIBRARY_PATH=/tmp/wrk/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONPATH=/tmp/site:$PWD:$PWD/service AQUEDUCT_PYTHON=python3 MOSEC_PYTHON=python3
python3 -c "import torch, onnxruntime, uvicorn; print('torch', torch.__version__, torch.cuda.get_device_name(0), \
'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
echo "== runtimes in process (ResNet-18, batch 64)"
python3 bench/gpu/runtimes.py --device cuda --iters "${ITERS:-30}" --json "$OUT/runtimes.json" 2>&1 | tee "$OUT/runtimes.txt"
echo "== ResNet-50: ceiling, the pod, mosec"
OUT=$OUT bench/gpu/run.sh "${1:-8}" 2>&1 | tee "$OUT/run.txt"
