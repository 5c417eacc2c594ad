#!/usr/bin/env bash
# Single machine (CPU or one/few GPUs): sets up .venv if missing, then trains.
#   bash launch/local.sh                       # tiny LocCa on locca_shapes (CPU, minutes)
#   bash launch/local.sh configs/locca_b16.py workdirs/locca_b16 --config.input.batch_size=256
# Extra arguments after CONFIG and WORKDIR are passed to locca_jax.train (config overrides).
# Several processes on this machine (multi-host, simulated): see README "Multi-host".
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set /p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
config="${1:-configs/locca_b16.py:runlocal}"
workdir="${2:-workdirs/locca_runlocal}"
shift $(( $# > 2 ? 2 : $# ))
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -r requirements.txt
fi
if command -v nvidia-smi > /dev/null; then
  # shellcheck source=launch/xla_gpu_env.sh
  source launch/xla_gpu_env.sh
fi
.venv/bin/python -m locca_jax.train --config="${config}" --workdir="${workdir}" "$@"
