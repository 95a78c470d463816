"""`python -m negjax.convert`: every failure is one `error:` line and exit 2, never a hang,
a traceback or a file in a format nobody asked for; success prints two lines, no chatter."""
import os
import subprocess
import sys

import pytest

from negjax.models import clip, weights

# A hang detector only (a failed Orbax write used to block exit for Orbax's 5-minute
# signal timeout); a working run takes seconds.
HANG = 240


def convert(*args):
  result = subprocess.run([sys.executable, "-m", "negjax.convert", *map(str, args)],
                          capture_output=True, text=True, timeout=HANG,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return result.returncode, result.stdout.splitlines(), result.stderr.splitlines()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  """A plain open_clip-layout file: no record of its activation."""
  from safetensors.numpy import save_file
  path = str(tmp_path_factory.mktemp("convert") / "plain.safetensors")
  save_file(weights.state_dict(clip.create(clip.get_config("negjax-tiny"))), path)
  return path


def test_success_prints_two_lines_and_no_orbax_chatter(tmp_path, plain):
  rc, out, err = convert(plain, tmp_path / "orbax", "--arch", "negjax-tiny")
  assert rc == 0, err
  assert out == [f"read {plain}: negjax-tiny, 7.2M parameters", f"wrote {tmp_path / 'orbax'}"]
  assert err == []
  assert weights.load_model(str(tmp_path / "orbax")).config.architecture == \
      clip.get_config("negjax-tiny").architecture


def test_unknown_out_suffix_is_refused(tmp_path, plain):
  rc, out, err = convert(plain, tmp_path / "model.pt", "--arch", "negjax-tiny")
  assert (rc, out) == (2, [])
  assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'model.pt'}: cannot write")
  assert not os.path.exists(tmp_path / "model.pt")


def test_unpinned_activation_is_one_line(tmp_path, plain):
  rc, out, err = convert(plain, tmp_path / "out.safetensors")
  assert (rc, out) == (2, [])
  assert len(err) == 1 and "does not record its activation" in err[0], err
  rc, out, err = convert(plain, tmp_path / "out.safetensors", "--heads", "2,2",
                         "--no-quick-gelu")
  assert rc == 0, err


def test_failed_orbax_write_exits_with_one_line(tmp_path, plain):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  rc, out, err = convert(plain, blocker / "orbax", "--arch", "negjax-tiny")
  assert rc == 2
  assert len(err) == 1 and err[0].startswith(f"error: could not write {blocker / 'orbax'}"), err


def test_folder_replaced_under_orbax_fails_at_once(tmp_path):
  """The folder turns into a file after negjax made it, so Orbax's own folder creation
  fails: the save must raise and the process exit, not wait on Orbax's threads."""
  code = """
import os, sys
from negjax.models import clip, weights
target = sys.argv[1]
real = os.makedirs
def replace_after_making(path, *a, **k):
  real(path, *a, **k)
  if os.path.abspath(path) == target:
    os.rmdir(path)
    open(path, "w").close()
os.makedirs = replace_after_making
try:
  weights.save_orbax(clip.create(clip.get_config("negjax-tiny")), target)
except OSError as e:
  print("raised", type(e).__name__)
"""
  result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=HANG,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "raised NotADirectoryError"
