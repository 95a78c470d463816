"""A CSV of `image_path,positive_objects,negative_objects` -> NegCap/NegMCQ data.

  python -m negjax.data.make --config configs/data/csv.py --config.out=/data/mine \
      --config.train_csv=/data/train.csv --config.eval_csv=/data/val.csv

Objects are separated by `;` (e.g. `dog;frisbee`); negative_objects is optional and may be
empty, in which case absent objects are sampled from the other objects named in the file.
Relative image paths are resolved against image_root (default: each CSV's directory).
Rows with no positive objects, contradictory objects or missing images are skipped and
listed in summary.json; a malformed file stops with an error naming file and row.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.source = "csv"
  c.name = "custom"
  c.out = ""
  c.train_csv = ""
  c.eval_csv = ""
  c.image_root = ml_collections.config_dict.placeholder(str)  # None: the CSV's directory
  c.check_images = True
  c.seed = 0
  c.image_size = 224
  c.train_size = -1
  c.eval_size = -1
  c.shards = 16
  c.workers = 0
  c.num_affirmative = 2
  c.num_negcap = 3
  c.num_absent = 4
  c.paraphraser = ""
  c.paraphraser_batched = False
  c.progress = True
  return c
