"""`python -m negjax.convert SRC OUT`: CLIP weights from any supported format to
open_clip-layout `.safetensors` (OUT ends in .safetensors) or a negjax Orbax checkpoint
(OUT is an existing folder or a name without a suffix).

  python -m negjax.convert ViT-B-32.pt vitb32.safetensors
  python -m negjax.convert openai:ViT-B-32 ckpt/vitb32 --arch ViT-B-32-quickgelu
  python -m negjax.convert open_clip_state_dict.pt out.safetensors --arch ViT-B-32

Errors (unreadable input, an architecture the file does not pin down, a failed write) end
the process with one `error:` line and exit status 2; `--debug` shows the traceback.
"""
import argparse
import logging
import os
import sys

from negjax import cli
from negjax.models import clip, weights


def _heads(text):
  try:
    vision, text_heads = (int(x) for x in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected VISION,TEXT head counts, got {text!r}")
  return vision, text_heads


def out_format(out: str) -> str:
  """"safetensors" or "orbax" for an OUT path; anything else (e.g. model.pt, which
  negjax cannot write) is refused rather than silently written as an Orbax folder."""
  if out.endswith(".safetensors"):
    return "safetensors"
  if os.path.isdir(out) or not os.path.splitext(os.path.basename(out.rstrip("/")))[1]:
    return "orbax"
  raise cli.UserError(f"{out}: cannot write this format; OUT must end in .safetensors, or be "
                      "a folder (an existing one, or a name without a suffix) for Orbax")


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(
      prog="python -m negjax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("src", help="a .pt/.bin/.safetensors file, a Hugging Face CLIPModel "
                      "folder, a negjax Orbax folder, or openai:ARCH")
  parser.add_argument("out", help="NAME.safetensors, or a folder for an Orbax checkpoint")
  parser.add_argument("--arch", default=None, help="architecture name, for files that do not "
                      f"record it; one of {', '.join(sorted(clip.ARCHITECTURES))}")
  parser.add_argument("--heads", type=_heads, default=None, metavar="VISION,TEXT",
                      help="attention heads per tower, for shapes no --arch has")
  parser.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                      help="the activation, with --heads (QuickGELU, or GELU with --no-)")
  parser.add_argument("--allow-nonfinite", action="store_true",
                      help="convert weights that hold NaN/Inf (with a warning)")
  parser.add_argument("--debug", action="store_true", help="tracebacks for errors")
  args = parser.parse_args(argv)
  # negjax's own messages (e.g. a download) only; Orbax's INFO lines are noise here.
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("negjax").setLevel(logging.INFO)
  if args.arch is not None and args.arch not in clip.ARCHITECTURES:
    cli.fail(f"--arch {args.arch}: unknown{clip.near_names(args.arch)}")
  try:
    fmt = out_format(args.out)
    model = weights.load_model(args.src, arch=args.arch, heads=args.heads,
                                   quick_gelu=args.quick_gelu,
                                   allow_nonfinite=args.allow_nonfinite)
  except cli.user_errors() as e:
    if args.debug or cli.debugging(argv):
      raise
    cli.fail(e)
  name = clip.architecture_name(model.config) or "custom architecture"
  print(f"read {args.src}: {name}, {clip.num_params(model) / 1e6:.1f}M parameters")
  try:
    if fmt == "safetensors":
      weights.save_open_clip(model, args.out)
    else:
      weights.save_orbax(model, args.out)
  except Exception as e:  # any failed write (disk full, a file in the way, ...) is the user's
    if args.debug or cli.debugging(argv):
      raise
    cli.fail(f"could not write {args.out}: {type(e).__name__}: {e}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
