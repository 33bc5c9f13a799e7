#!/usr/bin/env bash
# Start NPROC local jaxlcd processes the way a pod does: JAX's standard variables (a coordinator on a free local
# port, JAX_NUM_PROCESSES, JAX_PROCESS_ID), one shared workdir, DEVICES CPU devices per process. If any process
# fails, the others are stopped; the exit status is the first failure's.
#   launch/multiprocess.sh NPROC WORKDIR [--config=configs/rglcd.py:tiny] [--config.key=value ...]
#   DEVICES=2 launch/multiprocess.sh 2 /tmp/mp --config=configs/rglcd.py:tiny --config.mesh.data=1 --config.mesh.fsdp=-1
set -uo pipefail
NPROC=${1:?usage: $0 NPROC WORKDIR [--config=FILE[:variant]] [--config.key=value ...]}
WORKDIR=${2:?usage: $0 NPROC WORKDIR [--config=FILE[:variant]] [--config.key=value ...]}
shift 2
CONFIG="--config=configs/rglcd.py:tiny"
if [ $# -gt 0 ] && [[ $1 == --config=* ]]; then CONFIG=$1; shift; fi
PYTHON=${PYTHON:-python}
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$NPROC" JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES:-1}"
pids=()
for ((i = 0; i < NPROC; i++)); do
  JAX_PROCESS_ID=$i "$PYTHON" -m jaxlcd.main "$CONFIG" --workdir="$WORKDIR" "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT   # a preemption reaches every process
status=0
while [ ${#pids[@]} -gt 0 ]; do
  wait -n -p done_pid "${pids[@]}"; rc=$?
  pids=("${pids[@]/$done_pid}"); pids=(${pids[@]})
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    echo "launch/multiprocess.sh: process $done_pid exited with status $rc; stopping the others" >&2
    kill -TERM "${pids[@]}" 2>/dev/null
  fi
done
exit "$status"
