"""Weights holding NaN/Inf are refused (naming the file, the tensors and the counts): every
feature and metric computed from them would be meaningless. allow_nonfinite=True warns."""
import logging

import numpy as np
import pytest

from negjax.models import clip, weights

CheckpointError = weights.CheckpointError


def _tiny():
  return clip.create(clip.get_config("negjax-tiny"), seed=0)


def test_state_dict_with_nan_and_inf_is_refused(tmp_path, caplog):
  model = _tiny()
  sd = weights.state_dict(model)
  sd["visual.proj"][0, :3] = np.nan
  sd["transformer.resblocks.1.mlp.c_fc.bias"][5] = np.inf
  path = str(tmp_path / "bad.safetensors")
  from safetensors.numpy import save_file
  save_file(sd, path)
  with pytest.raises(CheckpointError, match=r"bad\.safetensors: 4 NaN/Inf values in 2 tensors: "
                     r"transformer\.resblocks\.1\.mlp\.c_fc\.bias \(1\), visual\.proj \(3\); pass "
                     r"allow_nonfinite=True"):
    weights.load_model(path, arch="negjax-tiny")
  with caplog.at_level(logging.WARNING):
    loaded = weights.load_model(path, arch="negjax-tiny", allow_nonfinite=True)
  assert "4 NaN/Inf values in 2 tensors" in caplog.text
  assert np.isnan(np.asarray(loaded.visual.proj[...])).sum() == 3


def test_orbax_checkpoint_with_nan_is_refused(tmp_path):
  model = _tiny()
  model.text.text_projection.set_value(model.text.text_projection[...].at[1, 2].set(np.nan))
  weights.save_orbax(model, str(tmp_path / "orbax"))
  with pytest.raises(CheckpointError, match=r"orbax: 1 NaN/Inf values in 1 tensors: "
                     r".*text_projection.* \(1\)"):
    weights.load_model(str(tmp_path / "orbax"))
  loaded = weights.load_model(str(tmp_path / "orbax"), allow_nonfinite=True)
  assert np.isnan(np.asarray(loaded.text.text_projection[...])).sum() == 1
