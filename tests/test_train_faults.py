"""The trainer when something goes wrong: a second run into a busy workdir, a changed config
on resume, a checkpoint write that fails, a corrupted checkpoint, a bad config. Each ends
with one `error:` line and exit status 2 (or, for a corrupted checkpoint, resumes from the
step before with one line saying so), never a traceback or a hang."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from test_train_run import ROOT, command, data_dir, run, steps_saved  # noqa: F401 (fixture)

HANG = 600  # seconds: only a hang detector; these runs take well under a minute each


def one_error_line(result) -> str:
  """The run failed with exit 2 and one `error:` line, no traceback."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if "error:" in l]
  assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr[-3000:]
  return errors[0]


def test_busy_workdir_is_refused_and_a_killed_run_leaves_no_stale_lock(data_dir, tmp_path):
  workdir = str(tmp_path / "busy")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  first = subprocess.Popen(command(workdir, data_dir, steps=100_000), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    while first.poll() is None and not steps_saved(workdir):
      time.sleep(0.05)
    assert first.poll() is None, "the first run ended early"
    second = run(command(workdir, data_dir, steps=100_000), timeout=HANG)
    line = one_error_line(second)
    assert "in use by another training run" in line and f"pid {first.pid}" in line
    assert first.poll() is None  # the second run did not disturb the first
  finally:
    first.kill()  # SIGKILL: the kernel drops its lock, the .lock file stays
    first.wait()
  assert first.returncode == -signal.SIGKILL
  assert os.path.exists(os.path.join(workdir, ".lock"))
  # The rerun gets past the lock to the resume check, which refuses the changed step count.
  third = run(command(workdir, data_dir, steps=4), timeout=HANG)
  line = one_error_line(third)
  assert "another config" in line and "total_steps: 100000 -> 4" in line
  assert "allow_config_change" in line


def _break_write_at_step_4(how):
  """A trainer whose checkpoint write at step 4 fails: the checkpoints folder replaced by a
  file (fails as the step's folder is made), or the array writer raising "No space left on
  device" in Orbax's background thread."""
  return f"""
import errno, runpy, shutil, sys
from negjax import checkpoint
save = checkpoint.Checkpointer.save
def failing_save(self, step, *args):
  if step == 4 and {how!r} == "folder":
    self.wait()
    shutil.rmtree(self.directory)
    open(self.directory, "w").write("not a folder any more")
  if step == 4 and {how!r} == "disk":
    from orbax.checkpoint._src.serialization import serialization
    async def full(*args, **kwargs):
      raise OSError(errno.ENOSPC, "No space left on device")
    serialization.async_serialize_from_host = full
  return save(self, step, *args)
checkpoint.Checkpointer.save = failing_save
sys.argv = ["negjax.train"] + sys.argv[1:]
runpy.run_module("negjax.train", run_name="__main__")
"""


@pytest.mark.parametrize("how", ["folder", "disk"])
def test_failed_checkpoint_write_ends_the_run_with_one_line(data_dir, tmp_path, how):
  workdir = str(tmp_path / how)
  cmd = command(workdir, data_dir, steps=6)
  cmd[1:3] = ["-c", _break_write_at_step_4(how)]  # instead of `-m negjax.train`
  result = run(cmd, timeout=HANG)  # the old trainer hung here ("folder") or printed pages
  line = one_error_line(result)
  assert line.startswith(f"error: could not write checkpoint step 4 to {workdir}/checkpoints")
  assert ("Not a directory" if how == "folder" else "No space left on device") in line
  assert not os.path.exists(os.path.join(workdir, "model.safetensors"))


def test_corrupted_latest_checkpoint_falls_back_to_the_step_before(data_dir, tmp_path):
  workdir = str(tmp_path / "corrupt")
  first = run(command(workdir, data_dir, steps=4), timeout=HANG)
  assert first.returncode == 0, first.stderr[-3000:]
  want = load_file(os.path.join(workdir, "model.safetensors"))
  assert steps_saved(workdir) == [2, 4]
  arrays = os.path.join(workdir, "checkpoints", "4", "state", "ocdbt.process_0", "d")
  for name in os.listdir(arrays):  # truncated, as by a full disk or a copy cut short
    with open(os.path.join(arrays, name), "r+b") as f:
      f.truncate(100)

  again = run(command(workdir, data_dir, steps=4), timeout=HANG)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Traceback" not in again.stderr
  notes = [l for l in again.stderr.splitlines() if "unreadable" in l]
  assert len(notes) == 1 and "checkpoint step 4 is unreadable" in notes[0], again.stderr
  assert "resumed from step 2" in again.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints_unreadable")) == ["4"]  # kept
  assert steps_saved(workdir) == [2, 4]  # step 4 written anew
  got = load_file(os.path.join(workdir, "model.safetensors"))
  for key in want:  # the exact resume from step 2 gives the same model
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)

  # Another architecture against this workdir: one line, not Orbax's advice.
  other = run(command(workdir, data_dir, "--config.model.arch=negjax-shapes",
                      "--config.allow_config_change=True", steps=4), timeout=HANG)
  line = one_error_line(other)
  assert "are of another model" in line and "model.arch" in line
  assert steps_saved(workdir) == [2, 4]  # nothing skipped or moved


def test_resuming_with_a_changed_config_is_refused(data_dir, tmp_path):
  """What a resume may not change without --config.allow_config_change=True (the allowed
  case is in test_train_run.test_restore_on_a_different_device_count)."""
  workdir = str(tmp_path / "changed")
  first = run(command(workdir, data_dir, steps=2), timeout=HANG)
  assert first.returncode == 0, first.stderr[-3000:]
  changed = run(command(workdir, data_dir, "--config.optim.lr=0.5", "--config.seed=3",
                        "--config.log_every=1", steps=2), timeout=HANG)
  line = one_error_line(changed)
  assert "optim.lr: 0.0002 -> 0.5" in line and "seed: 0 -> 3" in line
  assert "log_every" not in line  # how a run is watched may change freely


@pytest.mark.parametrize("overrides, message", [
    (["--config.batch_size=0"], "batch_size must be a positive integer, got 0"),
    (["--config.checkpoint_every=0"], "checkpoint_every must be a positive integer"),
    (["--config.total_steps=-3"], "total_steps must be a positive integer, got -3"),
    (["--config.log_every=0", "--config.eval.every=-1"], "log_every must be a positive "
     "integer, got 0; eval.every must be >= 0"),
    (["--config.loss.mcq_weight=-1"], "loss.mcq_weight must be a finite number >= 0"),
    (["--config.model.arch=ViT-Q-99"], "unknown architecture 'ViT-Q-99'"),
    (["--config.mesh.data=3"], "does not use the 8 devices"),
    (["--config.batch_size=12"], "batch_size 12 must divide by the 8 batch shards"),
    (["--config.batch_sise=16"], "batch_sise"),
])
def test_config_errors_are_one_line(data_dir, tmp_path, overrides, message):
  workdir = str(tmp_path / "w")
  result = run(command(workdir, data_dir, *overrides), timeout=HANG)
  assert message in one_error_line(result)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # stopped before any work


def test_missing_config_flag_is_one_line():
  result = run([sys.executable, "-m", "negjax.train"], timeout=HANG)
  assert "--config is required" in one_error_line(result)
