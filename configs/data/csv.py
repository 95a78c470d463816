"""A CSV of `image_path,positive_objects,negative_objects` -> NegCap/NegMCQ data.

  python -m negjax.data.make --config configs/data/csv.py --config.out=/data/mine \\
      --config.train_csv=/data/train.csv --config.eval_csv=/data/val.csv

Objects are separated by `;` (`dog;frisbee`). negative_objects is optional and may be
empty: absent objects are then sampled from the other objects named in the file, so
positive_objects must list every such object the image shows, or "no X" captions lie. Relative
image paths are resolved against --config.image_root (default: the CSV's directory).
Rows without positive objects, with an object both positive and negative, or with a
missing, unreadable or too large image are skipped, counted and listed in summary.json; a
malformed file (missing column, wrong number of fields, an image in two rows) stops with an
error naming the file and row. The "only"/"just" NegCap templates are not used: a CSV's
objects need not be everything in the photo. All knobs: negjax.data.make.default_config.
"""
from negjax.data import make


def get_config():
  return make.default_config("csv", shards=16)
