"""launch/tpu_vm.sh and launch/slurm_gpu.sh: the commands they print with --dry-run for a
v5e-256 slice and a 2-node x 8-GPU Slurm job, and that JAX reads that job's environment."""
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["--config.batch_size=4096", "--config.data.dir=gs://bucket/neg full"]


def dry_run(script, *args):
  p = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "--dry-run", *args],
                     capture_output=True, text=True, cwd=ROOT)
  assert p.returncode == 0, p.stderr
  return p.stdout.splitlines()


def commands(lines):
  return [shlex.split(l) for l in lines if l.strip() and not l.startswith("#")]


def test_tpu_vm_v5e_256():
  cmds = commands(dry_run("tpu_vm.sh", "--name", "negjax-a", "--zone", "us-west4-a",
                          "--accelerator", "v5litepod-256", "configs/negclip.py:paper",
                          *OVERRIDES))
  create = next(c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "queued-resources",
                                              "create"])
  assert create[create.index("--accelerator-type") + 1] == "v5litepod-256"
  assert create[create.index("--runtime-version") + 1] == "v2-alpha-tpuv5-lite"
  assert create[create.index("--zone") + 1] == "us-west4-a"
  names = [c[0] for c in cmds]
  order = [i for i, c in enumerate(cmds) if c[0] == "gcloud"]
  scp = next(c for c in cmds if "scp" in c)
  ssh = next(c for c in cmds if "ssh" in c)
  delete = next(c for c in cmds if "delete" in c)
  assert "--worker=all" in scp and "--worker=all" in ssh
  assert "git" in names  # the archive holds the project's own files (git ls-files)
  remote = ssh[ssh.index("--command") + 1]
  assert "pip install -q -e '.[tpu]'" in remote
  train = shlex.split(remote.split("NEGJAX_DISTRIBUTED=1 ", 1)[1].split(" 2>&1")[0])
  assert train == ["python", "-m", "negjax.train", "--config", "configs/negclip.py:paper",
                   *OVERRIDES]
  assert "--force" in delete and delete[5] == "negjax-a"
  assert order and cmds.index(create) < cmds.index(scp) < cmds.index(ssh)


def test_tpu_vm_keep_has_no_teardown_and_bad_use_is_refused():
  lines = dry_run("tpu_vm.sh", "--keep", "--name", "n", "--zone", "z", "--accelerator",
                  "v6e-256", "configs/negclip.py")
  assert not any("delete" in l for l in lines)
  assert any("v2-alpha-tpuv6e" in l for l in lines)
  p = subprocess.run(["bash", "launch/tpu_vm.sh", "--dry-run", "configs/negclip.py"], cwd=ROOT,
                     capture_output=True, text=True)
  assert p.returncode == 2


def test_slurm_two_nodes_of_eight_gpus():
  lines = dry_run("slurm_gpu.sh", "--nodes", "2", "--gpus-per-node", "8",
                  "configs/negclip.py:paper", *OVERRIDES)
  directives = dict(l.split("=", 1) for l in lines if l.startswith("#SBATCH") and "=" in l)
  assert directives["#SBATCH --nodes"] == "2"
  assert directives["#SBATCH --gpus-per-node"] == "8"
  assert directives["#SBATCH --ntasks-per-node"] == "1"  # one process drives a node's GPUs
  script = "\n".join(lines).replace("\\\n", " ")
  srun = next(shlex.split(l) for l in script.splitlines() if l.strip().startswith("srun"))
  assert "NEGJAX_DISTRIBUTED=1" in srun
  assert srun[srun.index("-m") + 1:] == ["negjax.train", "--config", "configs/negclip.py:paper",
                                         *OVERRIDES]
  assert "pip install -q -e '.[gpu]'" in script


def test_jax_reads_the_slurm_job():
  """What jax.distributed.initialize() sees in the second task of that job (its Slurm
  cluster detection; no coordinator is started)."""
  code = ("from jax._src import clusters as c; s = c.SlurmCluster; "
          "print(s.is_env_present(), s.get_coordinator_address(None, None).split(':')[0], "
          "s.get_process_count(), s.get_process_id())")
  env = dict(os.environ, SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_PROCID="1",
             SLURM_LOCALID="0", SLURM_STEP_NODELIST="gpu[007-008]",
             SLURM_JOB_NODELIST="gpu[007-008]")
  p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert p.stdout.split() == ["True", "gpu007", "2", "1"], p.stderr
