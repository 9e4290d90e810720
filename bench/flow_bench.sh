#!/usr/bin/env bash
# Side-by-side engine benchmark, upstream aqueduct 1.15.0 vs ours, alternating runs in one sitting.
# Usage: bench/flow_bench.sh [ROUNDS] [OUTDIR]   (default 2 rounds: upstream, ours, upstream, ours)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
out=${2:-/tmp/aqueduct-bench}
bench=${BENCH:-../shared/bench/flow_bench.py}
mkdir -p "$out"
if [ ! -x /tmp/venv-upstream/bin/python ]; then
  python3 -m venv /tmp/venv-upstream
  /tmp/venv-upstream/bin/pip install --quiet aqueduct==1.15.0 numpy psutil
fi
scripts/setup-venv
for i in $(seq 1 "$rounds"); do
  echo "== round $i: upstream"
  /tmp/venv-upstream/bin/python "$bench" --scenario all --json "$out/upstream-$i.json"
  echo "== round $i: ours"
  .venv/bin/python "$bench" --scenario all --json "$out/ours-$i.json"
done
python3 "$(dirname "$bench")/table.py" "$out"/upstream-*.json "$out"/ours-*.json
