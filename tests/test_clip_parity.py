"""negjax CLIP against open_clip and Hugging Face, from the same random weights, in every
file format negjax reads; plus export, numerics options and sharding."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from negjax.models import clip, weights
from negjax.reference import open_clip

torch = pytest.importorskip("torch")
oc = open_clip()

TOL = 1e-4  # max abs error in fp32, the bound


def random_open_clip(arch: str, seed: int):
  """An open_clip CLIP of `arch` with every tensor perturbed (LayerNorms included), so a
  parameter mapped to the wrong place cannot go unnoticed."""
  torch.manual_seed(seed)
  model = oc.CLIP(**clip.open_clip_config(clip.get_config(arch))).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.02)
  return model


def inputs(config, n=3, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((n, config.image_size, config.image_size, 3), np.float32)
  ids = rng.integers(1, 49406, (n, config.context_length)).astype(np.int32)
  ids[:, 0] = 49406
  for i, end in enumerate(rng.integers(2, config.context_length, n)):
    ids[i, end], ids[i, end + 1:] = 49407, 0
  return images, ids


def torch_features(model, images, ids):
  with torch.no_grad():
    img = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2))
    txt = model.encode_text(torch.from_numpy(ids).long())
    logits = model.logit_scale.exp() * (
        torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T)
  return img.numpy(), txt.numpy(), logits.numpy()


def assert_matches(model, ref, images, ids):
  img, txt, logits = ref
  np.testing.assert_allclose(np.asarray(model.encode_image(images)), img, rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(model.encode_text(ids)), txt, rtol=0, atol=TOL)
  per_image, per_text = model(images, ids)
  np.testing.assert_allclose(np.asarray(per_image), logits, rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(per_text), logits.T, rtol=0, atol=TOL)


def write_torchscript(sd: dict, path: str, input_resolution: int):
  """An archive laid out like OpenAI's releases: a TorchScript module whose state dict
  holds the weights (fp16, as OpenAI shipped them) and three int buffers."""
  class Holder(torch.nn.Module):
    def __init__(self):
      super().__init__()
      for key, value in sd.items():
        *parents, leaf = key.split(".")
        mod = self
        for name in parents:
          if not hasattr(mod, name):
            mod.add_module(name, torch.nn.Module())
          mod = getattr(mod, name)
        mod.register_parameter(leaf, torch.nn.Parameter(value.half(), requires_grad=False))
      self.register_buffer("input_resolution", torch.tensor(input_resolution))
      self.register_buffer("context_length", torch.tensor(77))
      self.register_buffer("vocab_size", torch.tensor(49408))

    def forward(self, x):
      return x

  torch.jit.save(torch.jit.script(Holder()), path)


@pytest.fixture(scope="module")
def tiny_ref():
  model = random_open_clip("negjax-tiny", seed=1)
  config = clip.get_config("negjax-tiny")
  images, ids = inputs(config)
  return model, config, images, ids, torch_features(model, images, ids)


def _files(tmp, model):
  sd = model.state_dict()
  paths = {}
  paths["state_dict.pt"] = os.path.join(tmp, "state_dict.pt")
  torch.save(sd, paths["state_dict.pt"])
  paths["train_ckpt.pt"] = os.path.join(tmp, "epoch_1.pt")
  torch.save({"epoch": 1, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}},
             paths["train_ckpt.pt"])
  from safetensors.torch import save_file
  paths["open_clip.safetensors"] = os.path.join(tmp, "open_clip.safetensors")
  save_file({k: v.contiguous() for k, v in sd.items()}, paths["open_clip.safetensors"])
  return paths


@pytest.mark.parametrize("fmt", ["state_dict.pt", "train_ckpt.pt", "open_clip.safetensors"])
def test_tiny_every_open_clip_format(tmp_path, tiny_ref, fmt):
  model, config, images, ids, ref = tiny_ref
  path = _files(str(tmp_path), model)[fmt]
  loaded = weights.load_model(path, arch="negjax-tiny")
  assert_matches(loaded, ref, images, ids)
  # Without `arch`: shapes give the architecture and its heads, but not the activation.
  with pytest.raises(weights.CheckpointError, match="does not record its activation.*"
                     "arch='negjax-tiny' for GELU.*arch='negjax-tiny-quickgelu'"):
    weights.load_model(path)
  inferred = weights.load_model(path, quick_gelu=False)
  assert inferred.config.architecture == config.architecture
  assert_matches(inferred, ref, images, ids)


def test_openai_torchscript_archive_quickgelu(tmp_path):
  """OpenAI's format (TorchScript, fp16, QuickGELU) is recognised without `arch`."""
  model = random_open_clip("negjax-tiny-quickgelu", seed=2)
  sd = model.state_dict()
  path = str(tmp_path / "ViT-tiny.pt")
  write_torchscript(sd, path, input_resolution=32)
  with torch.no_grad():  # the reference sees the same fp16-rounded weights
    for p in model.parameters():
      p.copy_(p.half().float())
  config = clip.get_config("negjax-tiny-quickgelu")
  images, ids = inputs(config, seed=3)
  loaded = weights.load_model(path)
  assert loaded.config.quick_gelu
  assert_matches(loaded, torch_features(model, images, ids), images, ids)


@pytest.mark.parametrize("arch,fmt", [("ViT-B-32", "open_clip.safetensors"),
                                      ("ViT-B-32-quickgelu", "state_dict.pt")])
def test_vit_b_32(tmp_path, arch, fmt):
  torch.manual_seed(0)
  model = oc.create_model(arch).eval()  # open_clip's own config and init for this name
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "ln" in name:
        p.add_(torch.randn_like(p) * 0.02)
  config = clip.get_config(arch)
  images, ids = inputs(config, n=2)
  ref = torch_features(model, images, ids)
  path = _files(str(tmp_path), model)[fmt]
  del model
  loaded = weights.load_model(path, arch=arch)
  assert loaded.config.quick_gelu == arch.endswith("quickgelu")
  assert_matches(loaded, ref, images, ids)


def test_hugging_face_clipmodel(tmp_path):
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(3)
  cfg = transformers.CLIPConfig(
      text_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=77, vocab_size=49408,
                       hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407),
      vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8,
                         hidden_act="quick_gelu"),
      projection_dim=64)
  hf = transformers.CLIPModel(cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(torch.randn_like(p) * 0.02)
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  config = clip.get_config("negjax-tiny-quickgelu")
  images, ids = inputs(config, seed=4)
  with torch.no_grad():
    px = torch.from_numpy(images).permute(0, 3, 1, 2)
    t_ids = torch.from_numpy(ids).long()
    img = hf.get_image_features(pixel_values=px)
    txt = hf.get_text_features(input_ids=t_ids)
    img = getattr(img, "pooler_output", img).numpy()
    txt = getattr(txt, "pooler_output", txt).numpy()
    logits = hf(input_ids=t_ids, pixel_values=px).logits_per_image.numpy()
  loaded = weights.load_model(str(tmp_path / "hf"))
  assert loaded.config.architecture == config.architecture
  assert_matches(loaded, (img, txt, logits), images, ids)


def test_export_loads_in_open_clip_and_round_trips(tmp_path, tiny_ref):
  model, config, images, ids, ref = tiny_ref
  ours = weights.from_state_dict({k: v.numpy() for k, v in model.state_dict().items()},
                                     config)
  path = str(tmp_path / "export.safetensors")
  weights.save_open_clip(ours, path)
  # open_clip reads the file through its own `pretrained=` path.
  cfg_dir = tmp_path / "cfg"
  cfg_dir.mkdir()
  (cfg_dir / "negjax-tiny.json").write_text(json.dumps(clip.open_clip_config(config)))
  oc.add_model_config(str(cfg_dir))
  theirs = oc.create_model("negjax-tiny", pretrained=path).eval()
  for a, b in zip(torch_features(theirs, images, ids), ref):
    np.testing.assert_allclose(a, b, rtol=0, atol=TOL)
  # import -> export -> import is bit-exact.
  again = weights.load_model(path)
  for a, b in zip(jax.tree.leaves(nnx.state(ours, nnx.Param)),
                  jax.tree.leaves(nnx.state(again, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_orbax_round_trip_and_convert_cli(tmp_path, tiny_ref):
  from negjax import convert
  model, config, images, ids, ref = tiny_ref
  src = _files(str(tmp_path), model)["state_dict.pt"]
  convert.main([src, str(tmp_path / "orbax"), "--arch", "negjax-tiny"])
  convert.main([str(tmp_path / "orbax"), str(tmp_path / "back.safetensors")])
  for path in (tmp_path / "orbax", tmp_path / "back.safetensors"):
    assert_matches(weights.load_model(str(path)), ref, images, ids)


def test_scan_and_remat_match_unrolled(tiny_ref):
  model, config, images, ids, ref = tiny_ref
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  for options in (dict(scan_layers=True), dict(remat=True), dict(scan_layers=True, remat=True)):
    assert_matches(weights.from_state_dict(sd, config.replace(**options)), ref, images, ids)


def test_bf16_compute_error_is_bounded(tiny_ref):
  """bf16 compute keeps fp32 params; features stay close in direction (cosine)."""
  model, config, images, ids, ref = tiny_ref
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  bf16 = weights.from_state_dict(sd, config.replace(dtype=jnp.bfloat16))
  assert jax.tree.leaves(nnx.state(bf16, nnx.Param))[0].dtype == jnp.float32
  for got, want in ((bf16.encode_image(images), ref[0]), (bf16.encode_text(ids), ref[1])):
    got = np.asarray(got)
    assert got.dtype == np.float32
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"bf16: min cosine {cos.min():.5f}, max abs error / max abs value {rel:.4f}")
    assert cos.min() > 0.999 and rel < 0.05


def test_forward_sharded_over_8_devices_equals_single_device(tiny_ref):
  from jax.sharding import NamedSharding, PartitionSpec as P
  assert jax.device_count() == 8
  model, config, _, _, _ = tiny_ref
  images, ids = inputs(config, n=16, seed=5)
  ours = weights.from_state_dict({k: v.numpy() for k, v in model.state_dict().items()},
                                     config)
  graphdef, state = nnx.split(ours)
  fwd = jax.jit(lambda s, x, t: nnx.merge(graphdef, s)(x, t)[0])
  single = np.asarray(fwd(state, images, ids))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch = NamedSharding(mesh, P("data"))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  sharded = fwd(state, jax.device_put(images, batch), jax.device_put(ids, batch))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), single, rtol=0, atol=1e-5)
