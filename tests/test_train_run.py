"""`python -m negjax.train` end to end, as subprocesses on a tiny shapes world: exact resume
after kill -9, restore on another device count, two cooperating processes (as two hosts),
a clean stop on a diverging loss, and the run's provenance. Faults: test_train_faults.py."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import tiny_shapes_world
from safetensors.numpy import load_file

from negjax import provenance


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tiny_shapes_world(tmp_path_factory, 96, 24, 4)


def command(workdir, data_dir, *overrides, steps=12):
  return [sys.executable, "-m", "negjax.train", "--config", "configs/negclip.py",
          f"--config.workdir={workdir}", f"--config.data.dir={data_dir}",
          "--config.model.init=random", "--config.model.arch=negjax-tiny",
          f"--config.total_steps={steps}", "--config.batch_size=16", "--config.log_every=2",
          "--config.checkpoint_every=2", "--config.keep_checkpoints=10",
          "--config.data.text_length=16", "--config.eval.enabled=False", *overrides]


def run(cmd, devices=8, **kw):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, **kw)


def final_params(workdir):
  return load_file(os.path.join(workdir, "model.safetensors"))  # the default export


def steps_saved(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  result = run(command(workdir, data_dir, "--config.eval.enabled=True",
                       "--config.eval.every=6"))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result.stdout


def test_run_evaluates_and_writes_log_report_and_curves(uninterrupted):
  uninterrupted, stdout = uninterrupted
  after = json.load(open(os.path.join(uninterrupted, "eval_after.json")))
  assert set(after) == {"shapes_val_mcq", "shapes_val_retrieval", "shapes_val_negated_retrieval"}
  assert 0 <= after["shapes_val_mcq"]["negative_accuracy"] <= 1
  assert re.search(r"shapes_val_mcq\s+negative_accuracy\s+[\d.]+\s+[\d.]+", stdout)  # table
  evals = [json.loads(l)["step"] for l in open(os.path.join(uninterrupted, "metrics.jsonl"))
           if '"eval"' in l]
  assert evals == [0, 6, 12]
  records = [json.loads(l) for l in open(os.path.join(uninterrupted, "metrics.jsonl"))]
  logged = [r for r in records if "loss" in r]
  assert [r["step"] for r in logged] == list(range(2, 13, 2))
  for key in ("contrastive_loss", "mcq_loss", "lr", "logit_scale", "samples_per_s",
              "step_time", "data_time"):
    assert all(np.isfinite(r[key]) for r in logged), key
  assert os.path.getsize(os.path.join(uninterrupted, "training.png")) > 0
  assert steps_saved(uninterrupted)[-1] == 12


def test_run_records_config_and_provenance(uninterrupted, data_dir):
  workdir, _ = uninterrupted
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["total_steps"] == 12 and config["model"]["arch"] == "negjax-tiny"
  record = json.load(open(os.path.join(workdir, "provenance.json")))
  assert record["negjax_version"] and record["date"] and record["finished"]
  assert record["architecture"] == "negjax-tiny" and record["dtype"] == "float32"
  assert "checkpoint" not in record  # random initial weights
  assert record["config"] == config and (record["start_step"], record["total_steps"]) == (0, 12)
  by_path = {d["path"]: d for d in record["data"]}
  train = by_path[os.path.join(data_dir, "train")]
  assert train["rows"] == 96 and train["sha256"] == provenance.sha256(train["path"])
  for name in ("shapes_val_mcq", "shapes_val_retrieval", "shapes_val_negated_retrieval"):
    csv_record = by_path[os.path.join(data_dir, "eval", name + ".csv")]
    assert csv_record["rows"] == 24 and csv_record["role"] == "eval"
    assert csv_record["sha256"] == provenance.sha256(csv_record["path"])
  exported = os.path.join(workdir, "model.safetensors")
  assert record["exported_model"]["sha256"] == provenance.sha256(exported)
  header = open(os.path.join(workdir, "report.txt")).read().split("\n\n")[0]
  assert f"negjax {record['negjax_version']}" in header
  assert record["exported_model"]["sha256"][:16] in header and "96 rows" in header


def test_kill_9_then_resume_gives_identical_parameters(data_dir, uninterrupted, tmp_path):
  workdir = str(tmp_path / "killed")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(command(workdir, data_dir), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  while proc.poll() is None and not steps_saved(workdir):
    time.sleep(0.005)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  saved = steps_saved(workdir)
  assert proc.returncode == -signal.SIGKILL and saved and saved[-1] < 12, saved
  assert os.path.exists(os.path.join(workdir, ".lock"))  # left by the killed run: no matter
  result = run(command(workdir, data_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {saved[-1]}" in result.stderr
  logged = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))
            if '"loss"' in l]
  assert logged == list(range(2, 13, 2))  # each step once, whatever the killed run wrote
  want, got = final_params(uninterrupted[0]), final_params(workdir)
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_restore_on_a_different_device_count(data_dir, uninterrupted, tmp_path):
  workdir = str(tmp_path / "moved")
  first = run(command(workdir, data_dir, "--config.mesh.fsdp=8", "--config.mesh.data=1",
                      steps=6), devices=8)
  assert first.returncode == 0, first.stderr[-3000:]
  # A longer run changes the learning-rate schedule: allowed only when asked, and logged.
  # (Here all 12 steps are in warmup, so the schedule is the same as the straight run's.)
  second = run(command(workdir, data_dir, "--config.allow_config_change=True", steps=12),
               devices=2)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from step 6" in second.stderr and "over 2 devices" in second.stderr
  assert "total_steps 6 -> 12" in second.stderr
  changes = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))
             if "config_change" in l]
  assert [c["config_change"] for c in changes] == [{"total_steps": [6, 12]}]
  assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == 12
  want, got = final_params(uninterrupted[0]), final_params(workdir)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5, err_msg=key)


def test_two_processes_train_and_evaluate_like_one(data_dir, tmp_path):
  """launch/local_multiprocess.sh: two processes, one CPU device each, parameters split over
  both (FSDP); same data stream, evaluation and final model as one process with two devices."""
  overrides = ("--config.mesh.fsdp=2", "--config.mesh.data=1", "--config.eval.enabled=True")
  one = str(tmp_path / "one")
  result = run(command(one, data_dir, *overrides, steps=4), devices=2)
  assert result.returncode == 0, result.stderr[-3000:]
  two = str(tmp_path / "two")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)
  args = command(two, data_dir, *overrides, steps=4)[5:]  # after `-m negjax.train --config X`
  result = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "configs/negclip.py",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "over 2 devices, 2 processes" in result.stderr
  want, got = final_params(one), final_params(two)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5, err_msg=key)
  want, got = (json.load(open(os.path.join(w, "eval_after.json"))) for w in (one, two))
  for name in want:
    for key, value in want[name].items():
      if isinstance(value, float):
        assert abs(got[name][key] - value) < 1e-6, (name, key)


def test_diverging_loss_stops_and_keeps_good_checkpoints(data_dir, tmp_path):
  workdir = str(tmp_path / "diverged")
  result = run(command(workdir, data_dir, "--config.optim.lr=1e38",
                       "--config.optim.grad_clip=0", "--config.checkpoint_every=1"))
  assert result.returncode == 2 and "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite") and "last good checkpoint" in last
  saved = steps_saved(workdir)
  assert saved and saved[-1] < 12
  assert not os.path.exists(os.path.join(workdir, "model.safetensors"))
