#!/usr/bin/env bash
# Runs negjax training as N cooperating local processes on CPU, the way N hosts would run
# (one coordinator on localhost, each process with its own devices and data slice).
#
#   launch/local_multiprocess.sh 2 configs/negclip.py --config.total_steps=20
# (PYTHON=/path/to/python picks the interpreter; default: python on PATH)
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,6p' "$0"
  exit 2
fi
n=$1 config=$2
shift 2
port=$((20000 + RANDOM % 20000))
pids=()
for ((i = 0; i < n; i++)); do
  NEGJAX_DISTRIBUTED=1 NEGJAX_COORDINATOR=localhost:$port NEGJAX_NUM_PROCESSES=$n \
    NEGJAX_PROCESS_ID=$i JAX_PLATFORMS=cpu \
    "${PYTHON:-python}" -m negjax.train --config "$config" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
