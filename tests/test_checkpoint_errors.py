"""Bad checkpoints give a CheckpointError naming the file (and key), never a deep traceback."""
import os
import pickle
import urllib.request

import numpy as np
import pytest
from safetensors.numpy import save_file

from negjax.models import clip, weights

CheckpointError = weights.CheckpointError


@pytest.fixture(scope="module")
def tiny_sd():
  return weights.state_dict(clip.create(clip.get_config("negjax-tiny"), seed=0))


def _save(tmp_path, sd, name="w.safetensors"):
  path = str(tmp_path / name)
  save_file(sd, path)
  return path


def test_missing_file(tmp_path):
  path = str(tmp_path / "nope.safetensors")
  with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
    weights.load_model(path)


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_truncated_file(tmp_path, tiny_sd, name):
  if name.endswith(".pt"):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / name)
    torch.save({k: torch.from_numpy(v) for k, v in tiny_sd.items()}, path)
  else:
    path = _save(tmp_path, tiny_sd, name)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 3])
  with pytest.raises(CheckpointError, match=name):
    weights.load_model(path)


def test_unknown_key(tmp_path, tiny_sd):
  path = _save(tmp_path, {**tiny_sd, "visual.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError, match=r"w.safetensors.*visual\.extra\.weight"):
    weights.load_model(path, arch="negjax-tiny")


def test_missing_key(tmp_path, tiny_sd):
  sd = dict(tiny_sd)
  del sd["transformer.resblocks.1.mlp.c_fc.bias"]
  path = _save(tmp_path, sd)
  with pytest.raises(CheckpointError, match=r"missing key 'transformer\.resblocks\.1\.mlp"):
    weights.load_model(path, arch="negjax-tiny")


def test_missing_top_level_key_when_inferring(tmp_path, tiny_sd):
  sd = {k: v for k, v in tiny_sd.items() if k != "visual.conv1.weight"}
  with pytest.raises(CheckpointError, match=r"missing key 'visual\.conv1\.weight'"):
    weights.load_model(_save(tmp_path, sd))


def test_wrong_shape_for_named_architecture(tmp_path, tiny_sd):
  with pytest.raises(CheckpointError, match=r"w.safetensors: key 'visual\.conv1\.weight' has shape"):
    weights.load_model(_save(tmp_path, tiny_sd), arch="ViT-B-32")


def test_unknown_architecture_name(tmp_path, tiny_sd):
  with pytest.raises(ValueError, match="Unknown architecture 'ViT-Q-99'"):
    weights.load_model(_save(tmp_path, tiny_sd), arch="ViT-Q-99")


class _RunsCode:
  def __reduce__(self):
    return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
  pytest.importorskip("torch")
  path = str(tmp_path / "evil.pt")
  with open(path, "wb") as f:
    pickle.dump({"visual.conv1.weight": _RunsCode()}, f, protocol=2)
  with pytest.raises(CheckpointError, match=r"evil\.pt: refused .*system"):
    weights.load_model(path)


def test_not_a_checkpoint(tmp_path):
  path = str(tmp_path / "notes.pt")
  with open(path, "w") as f:
    f.write("hello")
  pytest.importorskip("torch")
  with pytest.raises(CheckpointError, match=r"notes\.pt"):
    weights.load_model(path)


def test_folder_that_is_neither_hf_nor_orbax(tmp_path):
  with pytest.raises(CheckpointError, match="a folder must be"):
    weights.load_model(str(tmp_path))


def test_openai_name_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
  monkeypatch.setattr(weights, "CACHE_DIR", str(tmp_path))

  def offline(*a, **k):
    raise OSError("network unreachable")

  monkeypatch.setattr(urllib.request, "urlopen", offline)
  target = os.path.join(str(tmp_path), "openai", "ViT-B-32.pt")
  with pytest.raises(CheckpointError, match="put it at " + target):
    weights.load_model("openai:ViT-B-32")
  with pytest.raises(CheckpointError, match="unknown OpenAI model"):
    weights.load_model("openai:ViT-Z-1")


def test_failed_download_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(weights, "CACHE_DIR", str(tmp_path))

  class Broken:  # the connection drops after the first megabyte
    def __init__(self):
      self.calls = 0

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def read(self, n):
      self.calls += 1
      if self.calls > 1:
        raise OSError("connection reset")
      return b"x" * n

  monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Broken())
  with pytest.raises(CheckpointError, match="could not download"):
    weights.load_model("openai:ViT-B-32")
  assert os.listdir(os.path.join(str(tmp_path), "openai")) == []


def test_download_with_wrong_checksum_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(weights, "CACHE_DIR", str(tmp_path))

  class Wrong:
    def __enter__(self):
      self.left = [b"not the weights"]
      return self

    def __exit__(self, *exc):
      return False

    def read(self, n):
      return self.left.pop() if self.left else b""

  monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Wrong())
  with pytest.raises(CheckpointError, match="wrong SHA-256"):
    weights.load_model("openai:ViT-B-32")
  assert os.listdir(os.path.join(str(tmp_path), "openai")) == []
