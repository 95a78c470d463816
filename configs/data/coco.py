"""COCO instance annotations -> NegCap/NegMCQ training shards and NegBench eval CSVs.

  python -m negjax.data.make --config configs/data/coco.py --config.out=/data/negcoco \\
      --config.train_annotations=/coco/annotations/instances_train2017.json \\
      --config.train_images=/coco/train2017 \\
      --config.eval_annotations=/coco/annotations/instances_val2017.json \\
      --config.eval_images=/coco/val2017

An image's objects are its annotated category names; absent ones are sampled from the
other categories. Shard images are centre-cropped and resized to 224 px; the eval CSVs
point at the original files (paths relative to DIR/eval). Expect ~117k train records and
~4950 eval images: images without annotations, unknown category ids and missing files are
skipped, counted and listed in summary.json (so are images PIL refuses as decompression
bombs, with their path); an image id, category id or file_name listed twice stops with an
error naming it. The "only"/"just" NegCap templates are not used: COCO labels do not list
everything in a photo. Leave one annotation file empty to build only the other split.
All knobs: negjax.data.make.default_config.
"""
from negjax.data import make


def get_config():
  return make.default_config("coco", shards=64)
