#!/usr/bin/env bash
# Issue 6's GPU table in one go, most important first: the train-step benchmark of LocCa-B/16
# (batch 256, 224 px, 64 tokens, 32k vocabulary; configs/locca_b16.py) with one Cap row per
# image (CapPa-equal work) and with all three task rows, LocCa-L/16 (12-layer decoder) at
# batch 128, then the remat / scan alternatives for B/16. Each bench's log goes to
# OUT/<name>.log and its JSON line, tagged with the name, to OUT/bench.jsonl, so what
# finished survives a time limit; a bench that runs out of memory or time is logged and the
# next one runs.
#
#   OUT=/tmp/gpu_bench bash launch/gpu_bench.sh [extra locca_jax.bench flags, e.g. --repeats=3]
#
# Needs jax (GPU), flax, optax, orbax-checkpoint, ml_collections, absl-py; no TensorFlow.
# BENCH_TIMEOUT (seconds per bench, default 240) bounds each one.
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/xla_gpu_env.sh
out=${OUT:-/tmp/gpu_bench}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$python" -c 'import sys, jax, jaxlib, flax, optax; print("python", sys.version.split()[0],
"jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, "optax",
optax.__version__); print(jax.devices())'
  echo "XLA_FLAGS=${XLA_FLAGS}"
  git rev-parse HEAD 2>/dev/null || true
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

bench() {
  local name=$1
  shift
  echo "=== ${name}: python -m locca_jax.bench $*"
  timeout "${BENCH_TIMEOUT:-240}" "$python" -m locca_jax.bench "$@" > "$out/${name}.log" 2>&1
  local rc=$?
  tail -n 25 "$out/${name}.log"
  local line
  line=$(grep '^{' "$out/${name}.log" | tail -n 1)
  if [[ $rc -eq 0 && -n $line ]]; then
    "$python" -c 'import json, sys; r = json.loads(sys.argv[2]); r["name"] = sys.argv[1]
print(json.dumps(r))' "$name" "$line" >> "$out/bench.jsonl"
  else
    echo "{\"name\": \"${name}\", \"failed\": true, \"rc\": ${rc}}" >> "$out/bench.jsonl"
  fi
}

b16=(--config=configs/locca_b16.py --batch=256)
bench b16_cap "${b16[@]}" --tasks=cap "$@"
bench b16_all "${b16[@]}" --tasks=all "$@"
bench l16_all --config=configs/locca_b16.py --batch=128 --tasks=all --decode_batch=0 \
    --config.model.encoder.variant=L/16 --config.model.decoder.num_layers=12 "$@"
bench b16_all_remat_none "${b16[@]}" --tasks=all --decode_batch=0 \
    --config.model.remat_policy=none "$@"
bench b16_all_noscan "${b16[@]}" --tasks=all --decode_batch=0 --config.model.scan=False "$@"
cat "$out/bench.jsonl"
