"""False-caption rate of the caption engine, judged by its truth model (`Caption.is_true`).

  python benchmarks/caption_truth.py [--images 1000]
  git show REV:negjax/data/captions.py > /tmp/old_captions.py
  python benchmarks/caption_truth.py --engine /tmp/old_captions.py  # an older engine

Captions are generated for the shapes eval images the data engine makes (seed 0) and for a
COCO-like open-world input, then each is judged by this version's `Caption.is_true`: an
older engine's captions are re-labelled with this version's exclusive templates
(`captions.EXCLUSIVE`), so its "only A" captions are held to the stricter model too.
Prints, per source and kind, how many captions there are and how many are false.
"""
import argparse
import collections
import dataclasses
import importlib.util
import inspect

from negjax.data import captions
from negjax.data import make
from negjax.data import shapes

COCO_LIKE = ("person", "dog", "cat", "apple", "umbrella", "car", "orange", "chair", "bus",
             "bicycle", "cup", "bench")


def load_engine(path):
  if not path:
    return captions
  spec = importlib.util.spec_from_file_location("engine_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def items(n):
  """(source, present, absent, per-image rng, closed world) for n images of each source."""
  for index in range(n):
    scene = shapes.sample_scene(shapes.scene_rng(0, make.EVAL, index))
    yield ("shapes", [o.name for o in scene.objects], scene.absent,
           captions.caption_rng(0, make.EVAL, index), True)
  for index in range(n):
    rng = captions.caption_rng(1, make.EVAL, index)
    present = [str(o) for o in rng.choice(COCO_LIKE, size=int(rng.integers(1, 5)), replace=False)]
    yield "coco-like", present, captions.complete_absent(present, (), COCO_LIKE, rng, 4), \
        rng, False


def judge(caption, present):
  """This version's verdict on a caption from any engine version."""
  exclusive = caption.kind == "negcap" and caption.template in captions.EXCLUSIVE
  return captions.Caption(caption.text, caption.kind, caption.template,
                          tuple(caption.affirmed), tuple(caption.negated),
                          exclusive).is_true(present)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--engine", default="", help="a captions.py to audit (default: this)")
  args = parser.parse_args()
  engine = load_engine(args.engine)
  closed_arg = "closed_world" in inspect.signature(engine.annotate).parameters
  total, false = collections.Counter(), collections.Counter()
  examples = {}
  for source, present, absent, rng, closed in items(args.images):
    kw = {"closed_world": closed} if closed_arg else {}
    ann = engine.annotate(present, absent, rng, **kw)
    for c in ann.affirmative + ann.negcap + ann.mcq:
      groups = [(source, c.kind), (source, "negcap only/just")] if (
          c.kind == "negcap" and c.template in captions.EXCLUSIVE) else [(source, c.kind)]
      if c.kind in captions.MCQ_TYPES:  # one MCQ option per image is meant to be true
        groups = [(source, "mcq answer")] if c is ann.mcq[ann.answer] else []
      for g in groups:
        total[g] += 1
        if not judge(c, present):
          false[g] += 1
          examples.setdefault(g, (c.text, present))
  print(f"engine: {args.engine or 'this checkout'}; {args.images} images per source")
  print(f"{'source':10s} {'captions':18s} {'total':>7s} {'false':>7s} {'rate':>7s}")
  for g in sorted(total):
    print(f"{g[0]:10s} {g[1]:18s} {total[g]:7d} {false[g]:7d} {false[g] / total[g]:7.1%}")
  for g, (text, present) in sorted(examples.items()):
    print(f"  e.g. {g[0]} {g[1]}: {text!r} with present {present}")


if __name__ == "__main__":
  main()
