#!/usr/bin/env bash
# Runs negjax training on every host of a Cloud TPU VM slice.
#
#   launch/tpu_vm.sh NAME ZONE configs/negclip.py:paper --config.data.dir=gs://... [overrides]
#
# Copies this checkout to all workers, installs it with the TPU build of JAX, and starts
# `python -m negjax.train` on each host at once; JAX finds the other hosts by itself
# (jax.distributed.initialize), and each host reads its own slice of the data.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,8p' "$0"
  exit 2
fi
name=$1 zone=$2 config=$3
shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$here" --exclude=.venv --exclude=.git --exclude='runs' -czf /tmp/negjax.tgz .
gcloud compute tpus tpu-vm scp /tmp/negjax.tgz "$name":/tmp/negjax.tgz --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e
  mkdir -p ~/negjax && tar -C ~/negjax -xzf /tmp/negjax.tgz && cd ~/negjax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  NEGJAX_DISTRIBUTED=1 python -m negjax.train --config $config $*
"
