"""`python -m negjax.convert SRC OUT`: CLIP weights from any supported format to
open_clip-layout `.safetensors` (OUT ends in .safetensors) or a negjax Orbax checkpoint
(any other OUT, a folder).

  python -m negjax.convert ViT-B-32.pt vitb32.safetensors
  python -m negjax.convert openai:ViT-B-32 ckpt/vitb32 --arch ViT-B-32-quickgelu
"""
import argparse
import logging
import sys

from negjax.models import checkpoints, clip


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m negjax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("src", help="a .pt/.bin/.safetensors file, a Hugging Face CLIPModel "
                      "folder, a negjax Orbax folder, or openai:ARCH")
  parser.add_argument("out", help="NAME.safetensors, or a folder for an Orbax checkpoint")
  parser.add_argument("--arch", default=None, help="architecture name (default: inferred); "
                      f"one of {', '.join(sorted(clip.ARCHITECTURES))}")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    model = checkpoints.load_model(args.src, arch=args.arch)
  except checkpoints.CheckpointError as e:
    sys.exit(f"error: {e}")
  name = clip.architecture_name(model.config) or "custom architecture"
  print(f"read {args.src}: {name}, {clip.num_params(model) / 1e6:.1f}M parameters")
  if args.out.endswith(".safetensors"):
    checkpoints.save_open_clip(model, args.out)
  else:
    checkpoints.save_orbax(model, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
