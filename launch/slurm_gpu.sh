#!/usr/bin/env bash
# Trains negjax on several GPU nodes under Slurm: one process per node, each driving all of
# its node's GPUs.
#
#   launch/slurm_gpu.sh [--dry-run] [--nodes 2] [--gpus-per-node 8] [--partition P]
#       [--time 24:00:00] [--venv DIR] configs/negclip.py:paper --config.data.dir=/data/... [...]
#
# Writes a batch script that installs this checkout with the CUDA build of JAX into --venv
# (default: .venv-gpu here; the checkout must be on a filesystem every node sees) once, then
# `srun`s `python -m negjax.train` on every node with NEGJAX_DISTRIBUTED=1:
# jax.distributed.initialize() reads Slurm's environment (SLURM_JOB_NODELIST, SLURM_NTASKS,
# SLURM_PROCID) for the coordinator, process count and rank; each process reads its own
# slice of the data. Submits it with sbatch and streams the log (logs/negjax-JOBID.out);
# Ctrl-C cancels the job. --dry-run prints the batch script and the sbatch command instead.
# Check the config fits first: JAX_PLATFORMS=cpu python -m negjax.compile --gpu h200 ...
set -euo pipefail
usage() { sed -n '2,17p' "$0"; exit 2; }
dry=0 nodes=2 gpus=8 partition="" walltime=24:00:00
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$here/.venv-gpu
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --nodes) nodes=$2; shift ;;
    --gpus-per-node) gpus=$2; shift ;;
    --partition) partition=$2; shift ;;
    --time) walltime=$2; shift ;;
    --venv) venv=$2; shift ;;
    -h|--help) usage ;;
    --*) echo "slurm_gpu.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
  shift
done
[ $# -ge 1 ] || usage
train_args=$(printf ' %q' "$@")

script=$(cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=negjax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --exclusive
#SBATCH --time=$walltime
#SBATCH --output=$here/logs/negjax-%j.out
${partition:+#SBATCH --partition=$partition}
set -euo pipefail
cd $here
if [ ! -x $venv/bin/python ]; then  # once, on the first node; every node sees it
  python3 -m venv $venv && $venv/bin/pip install -q -e '.[gpu]'
fi
srun --nodes=$nodes --ntasks-per-node=1 --kill-on-bad-exit=1 \\
  env NEGJAX_DISTRIBUTED=1 $venv/bin/python -m negjax.train --config$train_args
EOF
)

if [ $dry = 1 ]; then
  echo "$script"
  echo "# submit: mkdir -p $here/logs && sbatch --parsable <this script>"
  exit 0
fi
mkdir -p "$here/logs"
job=$(sbatch --parsable <<<"$script")
echo "submitted job $job; log: $here/logs/negjax-$job.out"
trap 'scancel "$job"' INT TERM
until [ -e "$here/logs/negjax-$job.out" ]; do sleep 5; done
tail -F "$here/logs/negjax-$job.out" &
tailer=$!
while squeue -h -j "$job" 2>/dev/null | grep -q .; do sleep 15; done
kill "$tailer"
