#!/usr/bin/env bash
# One machine with one or more NVIDIA GPUs: all local GPUs form the mesh (data-parallel by default;
# add --config.mesh.fsdp=N to shard the student and optimizer state over N GPUs).
#
#   launch/gpu.sh WORKDIR [--config.key=value ...]        (VARIANT=sd15|sd21base|sd21, default sd21base)
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
WORKDIR=$1; shift
cd "$(dirname "$0")/.."
[ -d .venv ] || (python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[gpu]')
. .venv/bin/activate
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m jaxlcd.main --config="configs/rglcd.py:${VARIANT:-sd21base}" --workdir="$WORKDIR" "$@"
