"""The open_clip ViT family: every registered architecture is open_clip's own config, is
recognised from its shapes, and gives open_clip's features from the same weights.

Parity runs each family member at its real widths, heads, MLP ratios and image size but
with one layer per tower (the layers are identical blocks; what varies is their shape);
one full-size ViT-H-14 forward checks the real depth too.
"""
import json
import os

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from negjax.models import clip, weights
from negjax.reference import open_clip

torch = pytest.importorskip("torch")
oc = open_clip()
CONFIG_DIR = os.path.join(os.path.dirname(oc.__file__), "model_configs")
TOL = 1e-4  # max abs error in fp32, the bound

FAMILY = ["ViT-B-32", "ViT-B-32-256", "ViT-B-16", "ViT-B-16-plus-240", "ViT-L-14",
          "ViT-L-14-336", "ViT-H-14", "ViT-H-14-378", "ViT-H-16", "ViT-g-14", "ViT-bigG-14"]


def open_clip_json(name):
  with open(os.path.join(CONFIG_DIR, f"{name}.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("name", FAMILY)
def test_registered_config_is_open_clips(name):
  """Every field of open_clip's JSON is used or checked (unsupported ones raise)."""
  assert clip.get_config(name) == clip.from_open_clip_config(open_clip_json(name), name)
  quick = f"{name}-quickgelu"
  if os.path.exists(os.path.join(CONFIG_DIR, f"{quick}.json")):
    assert clip.get_config(quick) == clip.from_open_clip_config(open_clip_json(quick), quick)
  else:  # open_clip builds it with force_quick_gelu=True
    assert clip.get_config(quick) == clip.get_config(name).replace(quick_gelu=True)


def test_per_model_fields_are_open_clips():
  """The numbers that differ from a plain ViT, spelled out (not derived from the code)."""
  g, big_g = clip.get_config("ViT-g-14"), clip.get_config("ViT-bigG-14")
  assert (g.vision_mlp_ratio, g.text_mlp_ratio, g.vision_width // g.vision_heads) == \
      (4.3637, 4.0, 88)
  assert (big_g.vision_mlp_ratio, big_g.text_mlp_ratio, big_g.text_width, big_g.text_heads,
          big_g.vision_width // big_g.vision_heads) == (4.9231, 4.0, 1280, 20, 104)
  plus = clip.get_config("ViT-B-16-plus-240")
  assert (plus.image_size, plus.vision_heads, plus.text_width, plus.text_heads) == \
      (240, 14, 640, 10)
  assert clip.get_config("ViT-H-14-378").image_size == 378
  assert clip.get_config("ViT-B-32-256").image_size == 256


@pytest.mark.parametrize("name, field", [
    ("ViT-H-14-CLIPA", "vision_cfg.no_ln_pre=True"),
    ("ViT-H-14-worldwide", "text_cfg.hf_tokenizer_name='facebook/xlm-v-base'"),
    ("RN50", "ResNet"),
    ("coca_ViT-B-32", "unknown open_clip field multimodal_cfg"),
])
def test_configs_negjax_does_not_implement_are_refused(name, field):
  with pytest.raises(ValueError, match=f"{name}: .*{field}".replace("(", r"\(")):
    clip.from_open_clip_config(open_clip_json(name), name)
  for part, key, value in (("vision_cfg", "ls_init_value", 1e-5),
                           ("vision_cfg", "final_ln_after_pool", True),
                           ("vision_cfg", "attentional_pool", True),
                           ("text_cfg", "pool_type", "eos"),
                           ("text_cfg", "act_kwargs", {"approximate": "tanh"}),
                           ("vision_cfg", "norm_kwargs", {"eps": 1e-6})):
    cfg = open_clip_json("ViT-B-32")
    cfg[part][key] = value
    with pytest.raises(ValueError, match=f"{part}.{key}=.* is not supported"):
      clip.from_open_clip_config(cfg, "x")


def test_unknown_architecture_lists_near_names():
  with pytest.raises(ValueError, match=r"Unknown architecture 'ViT-H-14-quickgel'; did you "
                     r"mean ViT-H-14-quickgelu"):
    clip.get_config("ViT-H-14-quickgel")
  with pytest.raises(ValueError, match=r"'ViT-bigG14'; did you mean ViT-bigG-14"):
    clip.get_config("ViT-bigG14")


def shapes_only(config):
  """An open_clip state dict of `config` holding no data (shapes are all `infer_shapes`
  reads): built on torch's meta device, each tensor a broadcast zero."""
  with torch.device("meta"):
    model = oc.CLIP(**clip.open_clip_config(config))
  return {k: np.broadcast_to(np.float32(0), tuple(v.shape))
          for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", FAMILY)
def test_recognised_from_shapes_activation_asked(name):
  sd = shapes_only(clip.get_config(name))
  for quick in (False, True):
    config = weights.choose_config("f.safetensors", {}, sd, quick_gelu=quick)
    assert clip.architecture_name(config) == name + "-quickgelu" * quick
  with pytest.raises(weights.CheckpointError, match=rf"does not record its activation.*"
                     rf"arch='{name}' for GELU.*arch='{name}-quickgelu' for QuickGELU"):
    weights.choose_config("f.safetensors", {}, sd)


def test_shapes_of_no_architecture_name_the_key_and_the_candidates():
  sd = shapes_only(clip.get_config("ViT-B-16").replace(image_size=256))
  with pytest.raises(weights.CheckpointError, match=r"f\.pt: cannot tell the attention head "
                     r"count.*match no registered architecture; nearest: ") as error:
    weights.choose_config("f.pt", {}, sd)
  nearest = str(error.value).split("nearest: ")[1].split(". Pass")[0].split("; ")
  assert sorted(nearest[:2]) == [
      "ViT-B-16 (first mismatch: visual.positional_embedding, image_size 256 here, 224 there)",
      "ViT-B-32-256 (first mismatch: visual.conv1.weight, patch_size 16 here, 32 there)"]
  sd = shapes_only(clip.get_config("ViT-g-14").replace(vision_mlp_ratio=4.0))
  with pytest.raises(weights.CheckpointError, match=
                     r"nearest: ViT-g-14 \(first mismatch: visual\.transformer\.resblocks\.0\."
                     r"mlp\.c_fc\.weight, vision_mlp_ratio hidden 5632 here, 6144 there\)"):
    weights.choose_config("f.pt", {}, sd)


def test_files_that_record_one_mlp_ratio_still_load(tmp_path):
  """negjax files written before the per-tower ratio record `mlp_ratio` (both towers)."""
  config = clip.get_config("negjax-tiny")
  record = {k: v for k, v in config.architecture.items() if not k.endswith("mlp_ratio")}
  record["mlp_ratio"] = 4.0
  path = str(tmp_path / "old.safetensors")
  model = clip.create(config, seed=3)
  save_file(weights.state_dict(model), path,
            metadata={weights.CONFIG_KEY: json.dumps(record)})
  loaded = weights.load_model(path)
  assert loaded.config == config and clip.architecture_name(loaded.config) == "negjax-tiny"
  theirs = weights.state_dict(loaded)
  for key, value in weights.state_dict(model).items():
    np.testing.assert_array_equal(theirs[key], value, err_msg=key)


def random_open_clip(config, seed=0, perturb=True):
  """open_clip's CLIP of `config`; with `perturb`, every tensor (LayerNorms included) moved
  off its init, so a parameter mapped to the wrong place cannot go unnoticed."""
  torch.manual_seed(seed)
  model = oc.CLIP(**clip.open_clip_config(config)).eval()
  if perturb:
    with torch.no_grad():
      for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
  return model


def inputs(config, n, seed=0):
  """Images, and texts of random length: SOT, tokens, EOT (the largest id), padding."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((n, config.image_size, config.image_size, 3), np.float32)
  ids = np.zeros((n, config.context_length), np.int32)
  sot, eot = config.vocab_size - 2, config.vocab_size - 1
  for i, end in enumerate(rng.integers(3, config.context_length, n)):
    ids[i, 0], ids[i, 1:end], ids[i, end] = sot, rng.integers(1, sot, end - 1), eot
  return images, ids


def reference_features(reference, images, ids):
  with torch.no_grad():
    return (reference.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy(),
            reference.encode_text(torch.from_numpy(ids).long()).numpy())


def assert_parity(want, model, images, ids):
  """negjax's features against `want` (the reference's); returns the max errors."""
  # one compiled program (op-by-op dispatch would compile each op for each new shape)
  got = nnx.jit(lambda m, x, t: (m.encode_image(x), m.encode_text(t)))(model, images, ids)
  errors = []
  for ours, theirs in zip(got, want):
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=TOL)
    errors.append(np.abs(np.asarray(ours) - theirs).max())
  return errors


@pytest.mark.parametrize("name", FAMILY + ["ViT-B-32-quickgelu"])
def test_parity_with_open_clip_at_one_layer(tmp_path, name):
  """Real widths, heads, MLP ratios and image size; one layer per tower and a 1,000-token
  vocabulary (the embedding table is a row lookup whatever its size; the real one is most
  of the small models' weights). The weights go through negjax's import path (a plain
  open_clip safetensors file, heads and activation stated since one layer fits no
  registered shape)."""
  config = clip.get_config(name).replace(vision_layers=1, text_layers=1, vocab_size=1000)
  reference = random_open_clip(config)
  path = str(tmp_path / "w.safetensors")
  save_file({k: v.numpy() for k, v in reference.state_dict().items()}, path)
  model = weights.load_model(path, heads=(config.vision_heads, config.text_heads),
                             quick_gelu=config.quick_gelu)
  assert clip.mlp_widths(model.config.architecture) == clip.mlp_widths(config.architecture)
  images, ids = inputs(config, n=2)
  errors = assert_parity(reference_features(reference, images, ids), model, images, ids)
  print(f"{name}: max |error| image {errors[0]:.2e}, text {errors[1]:.2e}")


def test_full_size_vit_h_14_forward():
  """ViT-H-14 at full depth (32 + 24 layers, 986M parameters), one image and one text."""
  config = clip.get_config("ViT-H-14")
  images, ids = inputs(config, n=1)
  reference = random_open_clip(config, perturb=False)
  want = reference_features(reference, images, ids)
  model = weights.from_state_dict(
      {k: v.numpy() for k, v in reference.state_dict().items()}, config, "ViT-H-14 (random)")
  del reference  # 4 GB: the two copies of the weights need not coexist past the import
  errors = assert_parity(want, model, images, ids)
  print(f"ViT-H-14 full size: max |error| image {errors[0]:.2e}, text {errors[1]:.2e}")
