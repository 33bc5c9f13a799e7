#!/usr/bin/env bash
# Start the same jaxlcd training command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [extra --config.key=value ...]
#
# WORKDIR must be shared by all hosts: a gs://bucket/run (jaxlcd/storage.py; the prepared data is kept on each
# host's local disk) or a mounted filesystem. The teacher and data given with --config.teacher / --config.data_dir
# are gs:// folders (copied once to each host), hub ids, or local folders present on every host at the same path.
# jax.distributed.initialize() is called automatically on multi-host TPU slices (see jaxlcd/parallel.py).
# Assumes the repo is checked out at ~/jaxlcd on each worker (this script installs it there once).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; WORKDIR=$3; shift 3
VARIANT=${VARIANT:-sd21base}
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd ~/jaxlcd
  [ -d .venv ] || (python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]')
  . .venv/bin/activate
  python -m jaxlcd.main --config=configs/rglcd.py:${VARIANT} --workdir=${WORKDIR} ${EXTRA}
"
