#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it, set up every worker, run the same training command on all
# workers, delete it. `bash launch/tpu_pod.sh --help` lists the variables to set.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash launch/tpu_pod.sh SUBCOMMAND [ARGS...]

Subcommands (each worker of the pod slice runs the same thing: gcloud ... --worker=all):
  create             create the TPU VM pod slice
  setup              copy this checkout to every worker (~/$REMOTE_DIR) and create its .venv
                     (requirements.txt + jax[tpu]); rerun after changing the code
  train [OVERRIDES]  on every worker: python -m locca_jax.train --config=$CONFIG
                     --workdir=$WORKDIR [OVERRIDES, e.g. --config.total_steps=1000];
                     rerunning it resumes from the latest checkpoint in $WORKDIR
  ssh [COMMAND...]   run COMMAND on every worker; without COMMAND, a shell on worker 0
  delete             delete the TPU VM pod slice

Variables (environment):
  PROJECT            GCP project id                               all subcommands
  ZONE               TPU zone, e.g. us-central2-b                 all subcommands
  TPU_NAME           name of the TPU VM, e.g. locca-v4-32         all subcommands
  ACCELERATOR_TYPE   pod slice type, e.g. v4-32 (4 hosts), v5p-64 create
  RUNTIME_VERSION    TPU VM image (default tpu-ubuntu2204-base)   create
  SPOT               1: create a Spot (preemptible) TPU           create (optional)
  WORKDIR            gs://BUCKET/PATH shared by all workers:      train
                     checkpoints/, metrics.jsonl, tensorboard/
  CONFIG             config file[:arg] (default configs/locca_b16.py)          train
  TFDS_DATA_DIR      gs://BUCKET/tensorflow_datasets holding prepared TFDS data
                     (optional; locca_shapes is generated on each worker)      train
  REMOTE_DIR         directory under each worker's home (default locca_jax)    setup, train
  PYTHON_VERSION     Python of each worker's .venv, fetched by uv (default 3.11) setup

Example (a v4-32: 4 hosts x 4 chips):
  export PROJECT=my-project ZONE=us-central2-b TPU_NAME=locca-v4-32 ACCELERATOR_TYPE=v4-32
  export WORKDIR=gs://my-bucket/locca_b16 CONFIG=configs/locca_b16.py
  bash launch/tpu_pod.sh create && bash launch/tpu_pod.sh setup
  bash launch/tpu_pod.sh train --config.input.batch_size=4096
  bash launch/tpu_pod.sh delete

Every worker runs one process; jax.distributed.initialize() finds the other workers through
the TPU metadata (LOCCA_DISTRIBUTED=auto, see locca_jax/distributed.py). Each process reads
its own part of the data; process 0 writes metrics.jsonl and TensorBoard; all processes write
the checkpoint together. Resuming needs the same number of hosts (the input position is saved
per process).
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

need() {  # need VAR...: fail naming every unset variable
  local missing=()
  local var
  for var in "$@"; do
    [[ -n "${!var:-}" ]] || missing+=("${var}")
  done
  if (( ${#missing[@]} )); then
    die "set ${missing[*]} (see: bash launch/tpu_pod.sh --help)"
  fi
}

tpu() {  # tpu VERB [ARGS...]: gcloud compute tpus tpu-vm VERB TPU_NAME --zone --project ...
  local verb="$1"
  shift
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI"
  gcloud compute tpus tpu-vm "${verb}" "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" "$@"
}

tpu_scp() {  # tpu_scp LOCAL_FILE REMOTE_PATH: copies to every worker
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI"
  gcloud compute tpus tpu-vm scp "$1" "${TPU_NAME}:$2" --worker=all --zone="${ZONE}" \
    --project="${PROJECT}"
}

on_all_workers() {  # on_all_workers 'shell command'
  tpu ssh --worker=all --command="$1"
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="${REMOTE_DIR:-locca_jax}"
subcommand="${1:-}"
if [[ $# -gt 0 ]]; then
  shift
fi

case "${subcommand}" in
  -h|--help|help|"")
    usage
    [[ -n "${subcommand}" ]] || exit 2
    ;;

  create)
    need PROJECT ZONE TPU_NAME ACCELERATOR_TYPE
    spot=()
    if [[ "${SPOT:-0}" == 1 ]]; then
      spot=(--spot)
    fi
    tpu create --accelerator-type="${ACCELERATOR_TYPE}" \
      --version="${RUNTIME_VERSION:-tpu-ubuntu2204-base}" "${spot[@]}"
    ;;

  setup)
    need PROJECT ZONE TPU_NAME
    jax_version="$(sed -n 's/^jax==//p' "${REPO}/requirements.txt")"
    [[ -n "${jax_version}" ]] || die "${REPO}/requirements.txt pins no jax==VERSION"
    archive="$(mktemp -t locca_jax.XXXXXX.tgz)"
    trap 'rm -f "${archive}"' EXIT
    tar -C "${REPO}" -czf "${archive}" --exclude=./.venv --exclude=./.git \
      --exclude=./workdirs --exclude='*/__pycache__' .
    tpu_scp "${archive}" locca_jax_src.tgz
    # Replaces the code but keeps an existing .venv (installs are idempotent, fast when done).
    on_all_workers "set -e
      mkdir -p ~/${REMOTE_DIR} && cd ~/${REMOTE_DIR}
      find . -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
      tar -xzf ~/locca_jax_src.tgz && rm ~/locca_jax_src.tgz
      [[ -x ~/.local/bin/uv ]] || python3 -m pip install --quiet --user uv \
        || curl -LsSf https://astral.sh/uv/install.sh | sh
      ~/.local/bin/uv venv --quiet --allow-existing --python ${PYTHON_VERSION:-3.11} .venv
      ~/.local/bin/uv pip install --quiet --python .venv/bin/python -r requirements.txt \
        'jax[tpu]==${jax_version}'
      .venv/bin/python -c 'import jax, locca_jax.train; print(\"jax\", jax.__version__, \"ok\")'"
    ;;

  train)
    need PROJECT ZONE TPU_NAME WORKDIR
    [[ "${WORKDIR}" == gs://* ]] || die "WORKDIR=${WORKDIR}: use gs://BUCKET/PATH (all workers \
must write the same checkpoint directory)"
    config="${CONFIG:-configs/locca_b16.py}"
    # The same command on every worker; arguments quoted for the remote shell.
    command="cd ~/${REMOTE_DIR} && LOCCA_DISTRIBUTED=auto"
    if [[ -n "${TFDS_DATA_DIR:-}" ]]; then
      command+=" TFDS_DATA_DIR=$(printf '%q' "${TFDS_DATA_DIR}")"
    fi
    command+=" .venv/bin/python -m locca_jax.train"
    command+=" $(printf '%q ' "--config=${config}" "--workdir=${WORKDIR}" "$@")"
    on_all_workers "${command}"
    ;;

  ssh)
    need PROJECT ZONE TPU_NAME
    if [[ $# -eq 0 ]]; then
      tpu ssh --worker=0
    else
      on_all_workers "cd ~/${REMOTE_DIR} 2>/dev/null; $*"
    fi
    ;;

  delete)
    need PROJECT ZONE TPU_NAME
    tpu delete --quiet
    ;;

  *)
    usage >&2
    die "unknown subcommand '${subcommand}'"
    ;;
esac
