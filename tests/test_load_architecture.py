"""load_model builds only what the file (or the caller) pins down: the attention head
count and the activation are not visible in tensor shapes, so they are never guessed."""
import logging

import numpy as np
import pytest
from safetensors.numpy import save_file

from negjax.models import clip, weights
from negjax.reference import open_clip

torch = pytest.importorskip("torch")
oc = open_clip()
CheckpointError = weights.CheckpointError


def wide_heads_open_clip(quick_gelu: bool):
  """A small random open_clip CLIP whose heads are 80 wide (like ViT-H-14's): 4 heads of
  width 320, where width / 64 would say 5."""
  torch.manual_seed(0)
  model = oc.CLIP(
      embed_dim=64, quick_gelu=quick_gelu,
      vision_cfg=dict(image_size=32, patch_size=8, width=320, head_width=80, layers=2),
      text_cfg=dict(context_length=77, vocab_size=49408, width=320, heads=4, layers=2)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.02)
  return model


def features(model, images, ids):
  with torch.no_grad():
    return (model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy(),
            model.encode_text(torch.from_numpy(ids).long()).numpy())


def _inputs(n=3):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((n, 32, 32, 3), np.float32)
  ids = np.zeros((n, 77), np.int32)
  ids[:, 0], ids[:, 1:6], ids[:, 6] = 49406, rng.integers(1, 49000, (n, 5)), 49407
  return images, ids


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_heads_not_64_wide_are_refused_then_loaded_when_stated(tmp_path, quick_gelu):
  reference = wide_heads_open_clip(quick_gelu)
  path = str(tmp_path / "wide.pt")
  torch.save(reference.state_dict(), path)
  with pytest.raises(CheckpointError, match=r"wide\.pt: cannot tell the attention head count.*"
                     r"vision width 320.*text width 320.*heads=\(VISION_HEADS, TEXT_HEADS\)"):
    weights.load_model(path)
  with pytest.raises(CheckpointError, match="head count"):  # the activation alone is not enough
    weights.load_model(path, quick_gelu=quick_gelu)
  with pytest.raises(CheckpointError, match=r"wide\.pt: the file does not record its "
                     r"activation.*quick_gelu=False for GELU"):
    weights.load_model(path, heads=(4, 4))
  model = weights.load_model(path, heads=(4, 4), quick_gelu=quick_gelu)
  assert (model.config.vision_heads, model.config.text_heads) == (4, 4)
  images, ids = _inputs()
  want_image, want_text = features(reference, images, ids)
  np.testing.assert_allclose(np.asarray(model.encode_image(images)), want_image, atol=1e-4)
  np.testing.assert_allclose(np.asarray(model.encode_text(ids)), want_text, atol=1e-4)


def test_heads_that_do_not_divide_the_width_are_refused(tmp_path):
  path = str(tmp_path / "wide.pt")
  torch.save(wide_heads_open_clip(False).state_dict(), path)
  with pytest.raises(CheckpointError, match="3 vision heads do not divide width 320"):
    weights.load_model(path, heads=(3, 4), quick_gelu=False)


def test_registered_vit_h_14_is_open_clips():
  """ViT-H-14's 80-wide heads come from open_clip's own config, not from width / 64."""
  theirs = oc.get_model_config("ViT-H-14")
  ours = clip.open_clip_config(clip.get_config("ViT-H-14"))
  assert ours["embed_dim"] == theirs["embed_dim"]
  for tower, keys in (("vision_cfg", ("image_size", "layers", "width", "patch_size",
                                      "head_width")),
                      ("text_cfg", ("context_length", "vocab_size", "width", "heads", "layers"))):
    for key in keys:
      assert ours[tower][key] == theirs[tower][key], (tower, key)
  assert clip.get_config("ViT-H-14").vision_heads == 16 != 1280 // 64


def test_registered_shapes_pin_the_heads_but_not_the_activation(tmp_path):
  sd = weights.state_dict(clip.create(clip.get_config("negjax-tiny")))
  path = str(tmp_path / "plain.safetensors")
  save_file(sd, path)  # no negjax metadata: a plain open_clip export
  with pytest.raises(CheckpointError, match=r"plain\.safetensors: the file does not record its "
                     r"activation.*arch='negjax-tiny' for GELU.*official NegBench scripts.*"
                     r"arch='negjax-tiny-quickgelu' for QuickGELU"):
    weights.load_model(path)
  for kw, quick in ((dict(arch="negjax-tiny-quickgelu"), True), (dict(quick_gelu=False), False)):
    config = weights.load_model(path, **kw).config
    assert config.quick_gelu == quick and config.vision_heads == config.text_heads == 2


def test_recorded_heads_win_and_a_stated_activation_is_logged(tmp_path, caplog):
  path = str(tmp_path / "negjax.safetensors")
  weights.save_open_clip(clip.create(clip.get_config("negjax-tiny-quickgelu")), path)
  assert weights.load_model(path).config.quick_gelu  # recorded in the metadata
  with pytest.raises(CheckpointError, match=r"records \(2, 2\) attention heads.*not \(4, 4\)"):
    weights.load_model(path, heads=(4, 4), quick_gelu=True)
  with caplog.at_level(logging.WARNING):
    model = weights.load_model(path, arch="negjax-tiny")  # as the official scripts do
  assert not model.config.quick_gelu
  assert "records QuickGELU; using GELU as asked" in caplog.text
  with pytest.raises(CheckpointError, match="not both"):
    weights.load_model(path, arch="negjax-tiny", quick_gelu=False)
