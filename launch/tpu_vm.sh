#!/usr/bin/env bash
# Trains negjax on every host of a Cloud TPU VM slice: create (queued resource), install,
# run, stream logs, tear down.
#
#   launch/tpu_vm.sh [--dry-run] [--keep] [--spot] [--project P] --name NAME --zone ZONE \
#       --accelerator v5litepod-256 configs/negclip.py:paper --config.data.dir=gs://... [...]
#
# 1. `gcloud compute tpus queued-resources create` and waits until the slice is ACTIVE;
# 2. packs this checkout's own files (git ls-files: no venv, no runs) and copies them to
#    every worker, where `pip install -e '.[tpu]'` installs negjax with the TPU build of JAX;
# 3. starts `python -m negjax.train` on all hosts at once (NEGJAX_DISTRIBUTED=1: JAX finds its
#    peers by itself; each host reads its own slice of the data), streaming every worker's
#    output here and keeping a copy in ~/negjax-train.log on each;
# 4. deletes the slice when the run ends or fails (--keep: leave it up).
# --dry-run prints the commands instead of running them. Check the config fits first:
#   python -m negjax.compile --config CONFIG --topology v5e:16x16 [overrides]
set -euo pipefail
usage() { sed -n '2,18p' "$0"; exit 2; }
dry=0 keep=0 spot="" project="" name="" zone="" accelerator="" runtime=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --keep) keep=1 ;;
    --spot) spot=--spot ;;
    --project) project=$2; shift ;;
    --name) name=$2; shift ;;
    --zone) zone=$2; shift ;;
    --accelerator) accelerator=$2; shift ;;
    --runtime) runtime=$2; shift ;;
    -h|--help) usage ;;
    --*) echo "tpu_vm.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
  shift
done
[ $# -ge 1 ] && [ -n "$name" ] && [ -n "$zone" ] && [ -n "$accelerator" ] || usage
config=$1
shift
if [ -z "$runtime" ]; then  # the TPU VM image for the generation (Cloud TPU docs)
  case $accelerator in
    v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    v4-*) runtime=tpu-ubuntu2204-base ;;
    *) echo "tpu_vm.sh: give --runtime for $accelerator" >&2; exit 2 ;;
  esac
fi
gcloud_args=(--zone "$zone")
[ -n "$project" ] && gcloud_args+=(--project "$project")
here=$(cd "$(dirname "$0")/.." && pwd)
archive=/tmp/negjax-$name.tgz

run() {  # a command, printed (--dry-run) or run
  if [ $dry = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

train_args=$(printf ' %q' "$config" "$@")
remote="set -eo pipefail; mkdir -p ~/negjax && tar -C ~/negjax -xzf /tmp/negjax.tgz && cd ~/negjax && \
python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]' && \
NEGJAX_DISTRIBUTED=1 python -m negjax.train --config$train_args 2>&1 | tee ~/negjax-train.log"

teardown() {
  run gcloud compute tpus queued-resources delete "$name" "${gcloud_args[@]}" --force --quiet
}

run gcloud compute tpus queued-resources create "$name" --node-id "$name" \
  --accelerator-type "$accelerator" --runtime-version "$runtime" "${gcloud_args[@]}" $spot
if [ $keep = 0 ]; then
  if [ $dry = 1 ]; then echo "# on exit:"; teardown; else trap teardown EXIT; fi
fi
if [ $dry = 1 ]; then
  echo "# wait until: gcloud compute tpus queued-resources describe $name --zone $zone \
--format='value(state.state)' prints ACTIVE"
else
  until [ "$(gcloud compute tpus queued-resources describe "$name" "${gcloud_args[@]}" \
      --format='value(state.state)')" = ACTIVE ]; do sleep 30; done
fi
if [ $dry = 1 ]; then
  echo "git -C $here ls-files -z | tar -C $here --null -T - -czf $archive"
else
  git -C "$here" ls-files -z | tar -C "$here" --null -T - -czf "$archive"
fi
run gcloud compute tpus tpu-vm scp "$archive" "$name":/tmp/negjax.tgz "${gcloud_args[@]}" \
  --worker=all
run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=all --command "$remote"
