#!/usr/bin/env bash
# Training on a Cloud TPU VM pod slice: create the TPU VM (or reuse it), copy this checkout to
# every worker, install, and run the same command on all workers at once.
#
#   TPU_NAME=one-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 RUN_DIR=/mnt/shared/runs/five \
#     bash launch/tpu_pod.sh --config=configs/step1.py:five_branch --config.batch_size=512
#
# Arguments go to `python -m one_jax.main` on every worker. There, JAX detects the pod
# (jax.distributed, see one_jax/distributed.py): one process per worker, one global mesh over
# all TPU chips, each process reading its own shard of every global batch. The config's
# batch_size is the global batch over all chips.
#
# Variables:
#   TPU_NAME          (required) the TPU VM's name; reused when it exists
#   ZONE              (required) its zone, e.g. us-central2-b
#   RUN_DIR           (required) the run's --workdir on the workers, a directory that every
#                     worker sees at the same path (Filestore/NFS, or a bucket mounted with
#                     gcsfuse): all workers write the checkpoints into it together, worker 0 the
#                     metrics and plots. Running again with the same RUN_DIR resumes the run,
#                     also on a slice of another size.
#   ACCELERATOR_TYPE  the slice to create, e.g. v4-32 or v5litepod-16 (required only when
#                     TPU_NAME does not exist yet)
#   PROJECT           the Google Cloud project (default: gcloud's configured project)
#   RUNTIME_VERSION   TPU VM image (default tpu-ubuntu2204-base)
#   SPOT              1: create a Spot TPU VM (default 0)
#   INSTALL           0: skip copying and installing (the workers are set up already; default 1)
#   JAX_SPEC          the JAX requirement installed for TPUs (default "jax[tpu]")
#   XLA_CACHE         the compilation cache, on storage every worker sees (only process 0
#                     writes it; default: one_jax_xla_cache beside RUN_DIR)
#   Data: TFDS data under --config.data_dir (or an --config.npz_path) readable on every worker.
set -euo pipefail

missing=0
for name in TPU_NAME ZONE RUN_DIR; do
  if [[ -z ${!name:-} ]]; then
    echo "error: $name is not set (see the top of launch/tpu_pod.sh)" >&2
    missing=1
  fi
done
if [[ $missing == 1 ]]; then
  echo "e.g. TPU_NAME=one-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32" \
    "RUN_DIR=/mnt/shared/runs/NAME bash launch/tpu_pod.sh --config=configs/step1.py:five_branch" >&2
  exit 2
fi
if ! command -v gcloud > /dev/null; then
  echo "error: gcloud is not installed: see https://cloud.google.com/sdk/docs/install" >&2
  exit 2
fi
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
gcloud_args=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  gcloud_args+=(--project="$PROJECT")
fi

# --- the TPU VM
if gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gcloud_args[@]}" > /dev/null 2>&1; then
  echo "one_jax: reusing TPU VM $TPU_NAME"
else
  if [[ -z ${ACCELERATOR_TYPE:-} ]]; then
    echo "error: TPU VM $TPU_NAME does not exist and ACCELERATOR_TYPE is not set: e.g." \
      "ACCELERATOR_TYPE=v4-32 to create it" >&2
    exit 2
  fi
  create_args=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  if [[ ${SPOT:-0} == 1 ]]; then
    create_args+=(--spot)
  fi
  echo "one_jax: creating TPU VM $TPU_NAME ($ACCELERATOR_TYPE)"
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_args[@]}" "${create_args[@]}"
fi

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker=all --command="$1"
}

# --- code and packages on every worker
if [[ ${INSTALL:-1} == 1 ]]; then
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  archive=$(mktemp -t one_jax_src.XXXXXX.tgz)
  trap 'rm -f "$archive"' EXIT
  tar -czf "$archive" -C "$repo" --exclude=./.git --exclude=./runs --exclude=./.venv .
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":one_jax_src.tgz "${gcloud_args[@]}" \
    --worker=all
  on_all_workers "set -e; rm -rf ~/one_jax && mkdir -p ~/one_jax && \
tar -xzf ~/one_jax_src.tgz -C ~/one_jax && python3 -m venv ~/one_jax_venv && \
~/one_jax_venv/bin/pip install -q --upgrade pip && \
~/one_jax_venv/bin/pip install -q -e ~/one_jax $(printf '%q' "$JAX_SPEC")"
fi

# --- the run: the same command on every worker
XLA_CACHE=${XLA_CACHE:-$(dirname "$RUN_DIR")/one_jax_xla_cache}
run_args=$(printf ' %q' "--workdir=$RUN_DIR" "--config.compilation_cache_dir=$XLA_CACHE" "$@")
on_all_workers "set -e; mkdir -p $(printf '%q' "$RUN_DIR") && cd ~/one_jax && \
~/one_jax_venv/bin/python -m one_jax.main$run_args"
