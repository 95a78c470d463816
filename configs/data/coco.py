"""COCO instance annotations -> NegCap/NegMCQ training shards and NegBench eval CSVs.

  python -m negjax.data.make --config configs/data/coco.py --config.out=/data/negcoco \
      --config.train_annotations=/coco/annotations/instances_train2017.json \
      --config.train_images=/coco/train2017 \
      --config.eval_annotations=/coco/annotations/instances_val2017.json \
      --config.eval_images=/coco/val2017

Objects of an image are its annotated category names; absent objects are sampled from the
other categories. Images are centre-cropped and resized to image_size for the shards; the
eval CSVs point at the original files (paths relative to DIR/eval). Expect ~117k train
records and ~4950 eval images (val2017 images without annotations are skipped and listed
in summary.json, as are unknown category ids and missing files). Leave either annotation
file empty to build only the other split.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.source = "coco"
  c.name = "coco"
  c.out = ""
  c.train_annotations = ""
  c.train_images = ""
  c.eval_annotations = ""
  c.eval_images = ""
  c.check_images = True  # list missing image files as skipped when reading annotations
  c.seed = 0
  c.image_size = 224
  c.train_size = -1  # -1: every annotated image
  c.eval_size = -1
  c.shards = 64
  c.workers = 0
  c.num_affirmative = 2
  c.num_negcap = 3
  c.num_absent = 4
  c.paraphraser = ""
  c.paraphraser_batched = False
  c.progress = True
  return c
