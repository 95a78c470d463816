"""Images/s and texts/s of negjax against open_clip, with identical weights, in one run.

  python benchmarks/encode.py --arch ViT-B-32 --batch 32 --dtype float32

Both sides get the same random weights (open_clip's model, converted) and the same
inputs; each is warmed up, then timed over `--iters` batches. The ratio is negjax / open_clip.
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from negjax.models import clip, weights
from negjax.reference import open_clip


def timed(fn, iters):
  fn()  # warm-up (compilation)
  fn()
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - start) / iters


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="ViT-B-32")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  args = parser.parse_args()

  import torch
  torch.set_num_threads(args.threads)
  oc = open_clip()
  config = clip.get_config(args.arch)
  torch_model = oc.CLIP(**clip.open_clip_config(config)).eval()
  sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  model = weights.from_state_dict(sd, config.replace(dtype=jnp.dtype(args.dtype)))
  graphdef, state = nnx.split(model)

  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, config.image_size, config.image_size, 3), np.float32)
  ids = rng.integers(1, 49406, (args.batch, config.context_length)).astype(np.int32)
  ids[:, 20] = 49407
  ids[:, 21:] = 0

  encode_image = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x))
  encode_text = jax.jit(lambda s, t: nnx.merge(graphdef, s).encode_text(t))
  images_dev, ids_dev = jax.device_put(images), jax.device_put(ids)
  jax_img = timed(lambda: encode_image(state, images_dev).block_until_ready(), args.iters)
  jax_txt = timed(lambda: encode_text(state, ids_dev).block_until_ready(), args.iters)

  timg = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  tids = torch.from_numpy(ids).long()
  with torch.inference_mode():
    torch_img = timed(lambda: torch_model.encode_image(timg), args.iters)
    torch_txt = timed(lambda: torch_model.encode_text(tids), args.iters)

  b = args.batch
  flops = 2 * clip.num_params(model.visual) * (config.image_size // config.patch_size) ** 2
  print(f"{args.arch} batch {b}, negjax {args.dtype} vs open_clip float32, "
        f"{args.threads} torch threads, jax {jax.__version__} on {jax.devices()[0].platform}")
  print(f"{'':10s}{'negjax':>12s}{'open_clip':>12s}{'ratio':>8s}")
  print(f"{'images/s':10s}{b / jax_img:12.2f}{b / torch_img:12.2f}{torch_img / jax_img:8.2f}")
  print(f"{'texts/s':10s}{b / jax_txt:12.2f}{b / torch_txt:12.2f}{torch_txt / jax_txt:8.2f}")
  print(f"image tower ≈ {flops * b / jax_img / 1e9:.1f} GFLOP/s (negjax, matmul FLOPs only)")


if __name__ == "__main__":
  main()
