"""SigLIP's side of benchmarks/encode.py: transformers' SiglipModel / Siglip2Model (NaFlex;
random init) and negjax's import of the same weights, at the real widths with `layers`
layers per tower. NaFlex images: patch grids of several aspect ratios (GRIDS), padded to
256 patches."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from negjax.models import siglip

MODELS = ["siglip-base-patch16-224", "siglip-so400m-patch14-384", "siglip2-base-patch16-naflex"]
GRIDS = [(16, 16), (12, 21), (8, 32), (10, 25)]  # NaFlex images' patch grids, cycled


def siglip_pair(name: str, layers: int, batch: int, dtype: str) -> dict:
  """The fields of benchmarks/encode.py's `Pair` for one SigLIP architecture."""
  import torch
  from negjax.reference import open_clip
  open_clip()  # declares the torchvision ops transformers' import needs in the test venv
  import transformers
  config = siglip.ARCHITECTURES[name]
  if layers:
    config = config.replace(vision_layers=layers, text_layers=layers)
  naflex = config.max_num_patches
  hf = (transformers.Siglip2Model, transformers.Siglip2Config) if naflex else (
      transformers.SiglipModel, transformers.SiglipConfig)
  torch.manual_seed(0)
  theirs = hf[0](hf[1](**siglip.hf_config_dict(config))).eval()
  sd = {k: v.numpy() for k, v in theirs.state_dict().items()}
  ours = siglip.from_state_dict(sd, config.replace(dtype=jnp.dtype(dtype)))
  graphdef, state = nnx.split(ours)

  rng = np.random.default_rng(0)
  if naflex:
    grids = np.asarray([GRIDS[i % len(GRIDS)] for i in range(batch)])
    patches = np.zeros((batch, naflex, config.patch_size ** 2 * 3), np.float32)
    for i, (h, w) in enumerate(grids):
      patches[i, :h * w] = rng.standard_normal((h * w, patches.shape[2]))
    images = np.stack([siglip.to_sheet(p, g, config.image_size) for p, g in zip(patches, grids)])
    theirs_inputs = dict(pixel_values=torch.from_numpy(patches),
                         pixel_attention_mask=torch.from_numpy(
                             (np.arange(naflex) < grids.prod(1)[:, None]).astype(np.int32)),
                         spatial_shapes=torch.from_numpy(grids))
  else:
    images = rng.standard_normal((batch, config.image_size, config.image_size, 3), np.float32)
    theirs_inputs = dict(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
  ids = rng.integers(2, config.vocab_size, (batch, config.context_length)).astype(np.int32)
  ids[:, 20:] = 1  # EOS, then EOS padding (SigLIP's pad id)
  encode_image = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x))
  encode_text = jax.jit(lambda s, t: nnx.merge(graphdef, s).encode_text(t))
  images_dev, ids_dev = jax.device_put(images), jax.device_put(ids)
  tids = torch.from_numpy(ids).long()

  def torch_call(fn, **inputs):
    def call():
      with torch.inference_mode():
        fn(**inputs)
    return call

  return dict(
      name=name + (f" ({layers}+{layers} layers)" if layers else ""),
      reference="transformers" + (" Siglip2Model" if naflex else ""),
      ours_image=lambda: encode_image(state, images_dev).block_until_ready(),
      ours_text=lambda: encode_text(state, ids_dev).block_until_ready(),
      theirs_image=torch_call(theirs.get_image_features, **theirs_inputs),
      theirs_text=torch_call(theirs.get_text_features, input_ids=tids))
