"""Leaderboard cost: one run over N models against N separate evaluation runs.

  python benchmarks/leaderboard.py [--eval_size 300] [--random_shapes 2] [--order both]
                                   [--image_side 640]

Models: the packaged shapes-CLIP, `--random_shapes` random-init negjax-shapes models (64 px,
like it) and one random-init negjax-tiny (32 px), all on freshly built shapes eval files
(three CSVs). Each side starts from empty workdirs in this process; image decodes are
counted at eval_input's `open_image`. The leaderboard should decode each file's images once
per image size (here 2), the separate runs once per model. JAX's compilation caches are
cleared before each separate run and before the leaderboard, as separate processes would
start (the leaderboard compiles once per architecture). `--image_side 640` rewrites the
images at COCO's size (640 x 480 PNGs), where decoding costs what it does on real files. Prints both tables' agreement, decodes and seconds, and the leaderboard.
"""
import argparse
import os
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from negjax import cli, evaluate, leaderboard  # noqa: E402
from negjax.data import eval_input, make  # noqa: E402
from negjax.models import clip, weights  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "negbench.py")


def _config(**values):
  return cli.load_config(CONFIG, **values)


class Decodes:
  def __init__(self):
    self.count, self._open = 0, eval_input.open_image
    eval_input.open_image = self._counted

  def _counted(self, *args, **kwargs):
    self.count += 1
    return self._open(*args, **kwargs)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--eval_size", type=int, default=300)
  p.add_argument("--random_shapes", type=int, default=2)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--image_side", type=int, default=0, help="rewrite images WxW*3/4 (0: 64 px)")
  p.add_argument("--order", choices=["separate-first", "leaderboard-first", "both"],
                 default="both", help="both: separate, leaderboard, leaderboard, separate")
  args = p.parse_args()
  tmp = tempfile.mkdtemp(prefix="negjax-leaderboard-bench-")
  make.build(make.default_config("shapes", out=os.path.join(tmp, "data"), train_size=0,
                                 eval_size=args.eval_size, seed=11, progress=False))
  root = os.path.join(tmp, "data", "eval")
  if args.image_side:
    from PIL import Image
    for name in os.listdir(os.path.join(root, "images")):
      path = os.path.join(root, "images", name)
      Image.open(path).resize((args.image_side, args.image_side * 3 // 4),
                              Image.BICUBIC).save(path)
  os.chdir(tmp)  # models named by short relative paths in the table
  models = ["shapes"]
  for seed in range(args.random_shapes):
    models.append(f"shapes_random{seed}.safetensors")
    weights.save_open_clip(clip.create(clip.get_config("negjax-shapes"), seed=seed), models[-1])
  models.append("tiny_random.safetensors")
  weights.save_open_clip(clip.create(clip.get_config("negjax-tiny"), seed=0), models[-1])
  images = sum(len(ds.paths) for ds in evaluate.read_files("", root).values())
  decodes = Decodes()
  runs = {"separate-first": ["separate", "leaderboard"],
          "leaderboard-first": ["leaderboard", "separate"],
          "both": ["separate", "leaderboard", "leaderboard", "separate"]}[args.order]
  measured, tables = {}, {}
  for i, side in enumerate(runs):
    work = os.path.join(tmp, f"run{i}")
    start, decodes.count = time.perf_counter(), 0
    if side == "separate":
      table = {}
      for j, name in enumerate(models):
        jax.clear_caches()
        results = evaluate.run(_config(
            checkpoint=leaderboard.PACKAGED.get(name, name), data_root=root,
            workdir=os.path.join(work, str(j)), batch_size=args.batch_size))
        table[name] = {k: evaluate._format(v)
                       for k, v in evaluate.official_names(results).items()
                       if isinstance(v, float)}
    else:
      jax.clear_caches()
      columns, rows = evaluate.run(_config(checkpoints=",".join(models), data_root=root,
                                           workdir=work, batch_size=args.batch_size))
      table = {row[0]: {k: evaluate._format(v) for k, v in zip(columns[2:-1], row[2:-1])}
               for row in rows}
      tables["markdown"] = leaderboard.markdown(columns, rows)
    measured.setdefault(side, []).append((time.perf_counter() - start, decodes.count))
    tables[side] = table
  same = tables["separate"] == tables["leaderboard"]
  print(f"\n{len(models)} models ({len(models) - 1} at 64 px, 1 at 32 px), 3 files, "
        f"{images} image rows in all ({args.image_side or 64} px wide); batch {args.batch_size}")
  print(f"tables identical: {same}")
  print("| run | image decodes | seconds (each run) |\n|---|---:|---:|")
  for side, values in measured.items():
    print(f"| {side} | {values[0][1]} | {', '.join(f'{s:.1f}' for s, _ in values)} |")
  best = {side: min(s for s, _ in values) for side, values in measured.items()}
  print(f"separate / leaderboard, best of each: {best['separate'] / best['leaderboard']:.2f}x "
        f"time, {measured['separate'][0][1] / measured['leaderboard'][0][1]:.2f}x decodes")
  print()
  print(tables["markdown"])
  if not same:
    sys.exit(1)


if __name__ == "__main__":
  main()
