"""The shapes world: 48 objects (8 shapes x 6 colours), 1-4 per 64 px image.

  python -m negjax.data.make --config configs/data/shapes.py --config.out=/tmp/shapes

Writes DIR/train (50k records as ArrayRecord shards + TFDS metadata), DIR/eval (3000
images as PNG and the three NegBench CSVs: shapes_val_mcq.csv, shapes_val_retrieval.csv,
shapes_val_negated_retrieval.csv) and DIR/summary.json, then prints counts per template
(each NegCap template ~1/11 of captions, each MCQ answer type ~1/3). Nothing is skipped.
On 2 CPU cores it takes a few minutes; `--config.train_size=2000 --config.eval_size=200`
gives a small world in seconds. Output is identical for any `--config.workers`.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.source = "shapes"
  c.name = "shapes"
  c.out = ""  # required: output directory
  c.seed = 0
  c.image_size = 64
  c.train_size = 50_000
  c.eval_size = 3_000
  c.shards = 32  # fixed index ranges: the output does not depend on workers
  c.workers = 0  # processes writing shards; 0: one per CPU
  c.num_affirmative = 2
  c.num_negcap = 3
  c.num_absent = 4  # absent objects per image (half share a colour or shape with a present one)
  c.paraphraser = ""  # "package.module:function", str -> str (or list -> list if batched)
  c.paraphraser_batched = False
  c.progress = True
  return c
