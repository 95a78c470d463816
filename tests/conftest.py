"""Test setup: 8 fake CPU devices so sharding code runs as on a real mesh."""
import os
import subprocess
import sys

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


_BLOCK_TORCH = r"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("torch", "torchvision", "open_clip"):
      raise ImportError("blocked: " + name)
sys.meta_path.insert(0, _Block())
"""


@pytest.fixture
def run_without_torch():
  """Runs a Python snippet in a fresh process where importing torch/open_clip fails, and
  checks it never imported them: proves a code path works with the core install."""
  def run(code, *args):
    snippet = _BLOCK_TORCH + code + '\nassert "torch" not in sys.modules\n'
    result = subprocess.run([sys.executable, "-c", snippet, *map(str, args)],
                            capture_output=True, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr
    return result.stdout
  return run


def tiny_shapes_world(tmp_path_factory, train_size, eval_size, shards):
  """A small shapes world (32 px images) built once per test module that asks: its folder."""
  from negjax.data import make
  out = str(tmp_path_factory.mktemp("shapes"))
  make.build(make.default_config("shapes", out=out, train_size=train_size, eval_size=eval_size,
                                 image_size=32, shards=shards, workers=1, progress=False))
  return out
