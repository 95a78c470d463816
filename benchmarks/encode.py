"""Images/s and texts/s of negjax against its reference, per model family member, in one run.

  python benchmarks/encode.py                          # every open_clip ViT, 2 layers, fp32
  python benchmarks/encode.py --models ViT-B-32 --layers 0 --batch 32   # one, full depth

Each member runs at its real widths, heads, MLP ratios and image size with `--layers`
layers per tower (0: the real depth), so the whole family fits a CPU run. Both sides get
the same random weights (the reference's, imported by negjax) and the same inputs. Each
encoder is compiled and warmed up, then timed in interleaved rounds (negjax, reference,
negjax, ...) of `--iters` batches; the best round of each counts, so a burst of load from
other processes hurts both sides alike. ratio = negjax throughput / reference throughput.
"""
import argparse
import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from negjax.models import clip, layers, weights
from negjax.reference import open_clip

import encode_siglip  # benchmarks/encode_siglip.py: SigLIP vs transformers

CLIP_FAMILY = ["ViT-B-32", "ViT-B-32-256", "ViT-B-16", "ViT-B-16-plus-240", "ViT-L-14",
               "ViT-L-14-336", "ViT-H-14", "ViT-H-14-378", "ViT-H-16", "ViT-g-14",
               "ViT-bigG-14"]


@dataclasses.dataclass
class Pair:
  """One model on both sides: each callable encodes the fixed batch and waits for it."""
  name: str
  reference: str
  ours_image: Callable
  ours_text: Callable
  theirs_image: Callable
  theirs_text: Callable


def clip_pair(arch: str, layers: int, batch: int, dtype: str) -> Pair:
  """An open_clip CLIP (random init) and negjax's import of its weights."""
  import torch
  config = clip.get_config(arch)
  if layers:
    config = config.replace(vision_layers=layers, text_layers=layers)
  torch.manual_seed(0)
  theirs = open_clip().CLIP(**clip.open_clip_config(config)).eval()
  sd = {k: v.numpy() for k, v in theirs.state_dict().items()}
  graphdef, state = nnx.split(weights.from_state_dict(sd, config.replace(dtype=jnp.dtype(dtype))))

  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, config.image_size, config.image_size, 3), np.float32)
  ids = rng.integers(1, 49406, (batch, config.context_length)).astype(np.int32)
  ids[:, 20], ids[:, 21:] = 49407, 0
  encode_image = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x))
  encode_text = jax.jit(lambda s, t: nnx.merge(graphdef, s).encode_text(t))
  images_dev, ids_dev = jax.device_put(images), jax.device_put(ids)
  timages = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  tids = torch.from_numpy(ids).long()

  def torch_call(fn, x):
    def call():
      with torch.inference_mode():
        fn(x)
    return call

  return Pair(
      name=arch + (f" ({layers}+{layers} layers)" if layers else ""), reference="open_clip",
      ours_image=lambda: encode_image(state, images_dev).block_until_ready(),
      ours_text=lambda: encode_text(state, ids_dev).block_until_ready(),
      theirs_image=torch_call(theirs.encode_image, timages),
      theirs_text=torch_call(theirs.encode_text, tids))


def best_of(rounds: int, iters: int, *fns) -> list[float]:
  """Seconds per call of each fn: warm-up (compilation) twice, then the best of `rounds`
  interleaved rounds of `iters` calls."""
  for fn in fns:
    fn()
    fn()
  best = [float("inf")] * len(fns)
  for _ in range(rounds):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      for _ in range(iters):
        fn()
      best[i] = min(best[i], (time.perf_counter() - start) / iters)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(CLIP_FAMILY + encode_siglip.MODELS),
                      help="comma-separated architecture names")
  parser.add_argument("--layers", type=int, default=2, help="layers per tower; 0: real depth")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--iters", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--attention", default="auto", choices=["auto", "xla"],
                      help="negjax's attention (layers.use_attention); xla: "
                           "jax.nn.dot_product_attention on CPU at any length")
  args = parser.parse_args()
  with layers.use_attention(args.attention):
    run(args)


def run(args):
  import torch
  torch.set_num_threads(args.threads)
  b = args.batch
  print(f"batch {b}, negjax {args.dtype} vs reference float32, {args.threads} torch threads, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
        f"best of {args.rounds} interleaved rounds of {args.iters}, attention {args.attention}")
  print(f"{'model':34s} {'images/s':>9s} {'ref':>9s} {'ratio':>6s}  "
        f"{'texts/s':>9s} {'ref':>9s} {'ratio':>6s}  reference")
  for name in args.models.split(","):
    if name in encode_siglip.MODELS:  # transformers' SiglipModel vs negjax
      pair = Pair(**encode_siglip.siglip_pair(name, args.layers, b, args.dtype))
    else:
      pair = clip_pair(name, args.layers, b, args.dtype)
    ours_img, theirs_img, ours_txt, theirs_txt = best_of(
        args.rounds, args.iters, pair.ours_image, pair.theirs_image, pair.ours_text,
        pair.theirs_text)
    print(f"{pair.name:34s} {b / ours_img:9.1f} {b / theirs_img:9.1f} "
          f"{theirs_img / ours_img:6.2f}  {b / ours_txt:9.1f} {b / theirs_txt:9.1f} "
          f"{theirs_txt / ours_txt:6.2f}  {pair.reference}", flush=True)


if __name__ == "__main__":
  main()
