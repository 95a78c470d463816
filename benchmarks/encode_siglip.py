"""SigLIP's side of benchmarks/encode.py: transformers' SiglipModel (random init) and
negjax's import of the same weights, at the real widths with `layers` layers per tower."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from negjax.models import siglip

MODELS = ["siglip-base-patch16-224", "siglip-so400m-patch14-384"]


def siglip_pair(name: str, layers: int, batch: int, dtype: str) -> dict:
  """The fields of benchmarks/encode.py's `Pair` for one SigLIP architecture."""
  import torch
  from negjax.reference import open_clip
  open_clip()  # declares the torchvision ops transformers' import needs in the test venv
  import transformers
  config = siglip.ARCHITECTURES[name]
  if layers:
    config = config.replace(vision_layers=layers, text_layers=layers)
  torch.manual_seed(0)
  theirs = transformers.SiglipModel(
      transformers.SiglipConfig(**siglip.hf_config_dict(config))).eval()
  sd = {k: v.numpy() for k, v in theirs.state_dict().items()}
  ours = siglip.from_state_dict(sd, config.replace(dtype=jnp.dtype(dtype)))
  graphdef, state = nnx.split(ours)

  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, config.image_size, config.image_size, 3), np.float32)
  ids = rng.integers(2, config.vocab_size, (batch, config.context_length)).astype(np.int32)
  ids[:, 20:] = 1  # EOS, then EOS padding (SigLIP's pad id)
  encode_image = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x))
  encode_text = jax.jit(lambda s, t: nnx.merge(graphdef, s).encode_text(t))
  images_dev, ids_dev = jax.device_put(images), jax.device_put(ids)
  timages = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  tids = torch.from_numpy(ids).long()

  def torch_call(fn, **inputs):
    def call():
      with torch.inference_mode():
        fn(**inputs)
    return call

  return dict(
      name=name + (f" ({layers}+{layers} layers)" if layers else ""), reference="transformers",
      ours_image=lambda: encode_image(state, images_dev).block_until_ready(),
      ours_text=lambda: encode_text(state, ids_dev).block_until_ready(),
      theirs_image=torch_call(theirs.get_image_features, pixel_values=timages),
      theirs_text=torch_call(theirs.get_text_features, input_ids=tids))
