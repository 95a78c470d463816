"""Builds a negation data set: training shards + NegBench-format evaluation CSVs.

  python -m negjax.data.make --config configs/data/shapes.py --config.out=DIR

Output:
  DIR/train/NAME-train.array_record-*   training records (schema: negjax.data.records)
  DIR/train/dataset_info.json ...       TFDS metadata for the shards
  DIR/eval/NAME_val_mcq.csv             image MCQ (+ caption_k_type columns)
  DIR/eval/NAME_val_retrieval.csv       retrieval with affirmative captions
  DIR/eval/NAME_val_negated_retrieval.csv  retrieval with NegCap captions
  DIR/eval/images/*.png                 rendered images (shapes world only)
  DIR/summary.json                      counts per template, skipped inputs with reasons

Train and eval images are disjoint: shapes uses different generator streams, COCO/CSV
different annotation files. Every random choice is seeded by (seed, split, index).

A build writes into a fresh folder beside DIR and replaces DIR's train/, eval/ and
summary.json only once it has succeeded: a failed or killed build leaves the previous
output as it was (a killed build's folder is removed by the next build).
"""
import collections
import csv
import dataclasses
import functools
import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time

import ml_collections
import numpy as np

from negjax import cli
from negjax.data import annotations
from negjax.data import captions
from negjax.data import records
from negjax.data import shapes

TRAIN, EVAL = 0, 1  # split ids in the random streams
# Bump when the same config gives different output, so that caches keyed by `fingerprint`
# rebuild. 2: exclusive NegCap templates ("only A") name every present object, shapes only.
ENGINE_VERSION = 2
OUTPUTS = ("summary.json", "train", "eval")  # what a build owns in DIR


# A source has a length, a `vocabulary` of object names, `closed_world` (its present objects
# are everything in the image, see captions.EXCLUSIVE) and
# `get(index, size) -> (key, load_image, present, absent)`; `load_image()` gives the
# (size, size, 3) uint8 image, so train workers load files and eval skips loading them.


@dataclasses.dataclass(frozen=True)
class ShapesWorld:
  seed: int
  split: int
  count: int
  num_absent: int

  def __len__(self):
    return self.count

  def get(self, index, size):
    scene = shapes.sample_scene(shapes.scene_rng(self.seed, self.split, index),
                                num_absent=self.num_absent)
    key = f"{'train' if self.split == TRAIN else 'val'}_{index:07d}"
    return key, lambda: shapes.render(scene, size), tuple(o.name for o in scene.objects), \
        scene.absent

  vocabulary = shapes.OBJECTS
  closed_world = True


@dataclasses.dataclass(frozen=True)
class FileItems:
  annotations: annotations.Annotations
  count: int
  closed_world = False  # photos hold more than their labels

  def __len__(self):
    return self.count

  @property
  def vocabulary(self):
    return self.annotations.vocabulary

  def get(self, index, size):
    item = self.annotations.items[index]
    return item.key, lambda: annotations.load_image(item.image_path, size), item.present, \
        item.absent


@functools.cache
def _paraphraser(spec, batched):
  return captions.load_paraphraser(spec, batched)


@dataclasses.dataclass(frozen=True)
class Examples:
  """index -> (record, tags): the one place where objects become captions. Picklable."""
  source: object
  seed: int
  split: int
  image_size: int
  num_affirmative: int = 2
  num_negcap: int = 3
  num_absent: int = 4
  paraphraser: str = None
  paraphraser_batched: bool = False

  def annotate(self, index):
    key, image, present, absent = self.source.get(index, self.image_size)
    rng = captions.caption_rng(self.seed, self.split, index)
    absent = captions.complete_absent(present, absent, self.source.vocabulary, rng,
                                      self.num_absent)
    if not absent:
      raise records.Skip(key, "no absent object available (vocabulary too small)")
    paraphraser = _paraphraser(self.paraphraser, self.paraphraser_batched)
    try:
      ann = captions.annotate(present, absent, rng, self.num_affirmative, self.num_negcap,
                              paraphraser, self.paraphraser_batched, self.source.closed_world)
    except captions.Unannotatable as e:  # e.g. too few objects for 4 distinct MCQ options
      raise records.Skip(key, str(e)) from e
    return key, image, ann

  def load(self, key, image):
    try:
      return image()
    except OSError as e:  # missing, unreadable or too large (the message names the file)
      raise records.Skip(key, f"cannot read image: {e}") from e

  def __call__(self, index):
    key, image, ann = self.annotate(index)
    example = {
        "key": key, "image": self.load(key, image),
        "affirmative": [c.text for c in ann.affirmative],
        "negcap": [c.text for c in ann.negcap],
        "negcap_negated": [c.negated[0] for c in ann.negcap],
        "mcq_options": [c.text for c in ann.mcq],
        "mcq_types": [c.kind for c in ann.mcq],
        "mcq_answer": np.int32(ann.answer),
        "present": list(ann.present), "absent": list(ann.absent),
    }
    return example, tags(ann)


def tags(ann):
  """What gets counted in the summary."""
  return ([f"affirmative/{c.template}" for c in ann.affirmative]
          + [f"negcap/{c.template}" for c in ann.negcap]
          + [f"mcq_answer/{ann.answer_type}", f"mcq_answer_position/{ann.answer}"]
          + [f"mcq_option/{c.kind}" for c in ann.mcq])


def sources(config):
  """(train source, eval source, reader skips) for the configured input."""
  if config.source == "shapes":
    return (ShapesWorld(config.seed, TRAIN, config.train_size, config.num_absent),
            ShapesWorld(config.seed, EVAL, config.eval_size, config.num_absent), [])
  keys = {"coco": ("train_annotations", "eval_annotations"), "csv": ("train_csv", "eval_csv"),
          "captions": ("train_csv", "eval_csv")}
  if config.source not in keys:
    raise cli.UserError(f"unknown source {config.source!r}: use shapes, coco, csv or captions")
  if not any(config.get(k) for k in keys[config.source]):
    raise cli.UserError(f"set --config.{keys[config.source][0]} and/or "
                        f"--config.{keys[config.source][1]}")
  out, skipped = [], []
  for split in ("train", "eval"):
    if config.source == "coco":
      path = config.get(f"{split}_annotations")
      read = lambda p: annotations.read_coco(p, config.get(f"{split}_images"),
                                             config.check_images)
    elif config.source == "csv":
      path = config.get(f"{split}_csv")
      read = lambda p: annotations.read_csv(p, config.image_root, config.check_images)
    elif config.source == "captions":
      path = config.get(f"{split}_csv")
      read = lambda p: read_captions(p, config)
    if not path:
      out.append(None)
      continue
    ann = read(path)
    skipped += [(f"{split} {path}: {k}", reason) for k, reason in ann.skipped]
    size = config.get(f"{split}_size")
    out.append(FileItems(ann, len(ann.items) if size < 0 else min(size, len(ann.items))))
  return out[0], out[1], skipped


def read_captions(path, config):
  """A caption CSV (official layout, negjax.data.official) -> per-image objects, through the
  configured extractor (negjax.data.extract). Rows without a known object are skipped."""
  from negjax.data import extract, official
  table = official.read_captions(path, config.image_column, config.caption_column,
                                 config.separator, config.image_root, config.check_images)
  extractor = extract.make_extractor(config)
  items, skipped = [], list(table.skipped)
  for row, found in zip(table.rows, extractor.extract([r.caption for r in table.rows])):
    if found is None:
      skipped.append((row.key, "the extractor gave no usable answer"))
    elif not found.present:
      skipped.append((row.key, f"no known object in {row.caption!r}"))
    else:
      items.append(annotations.Item(row.key, row.image_path, found.present, found.absent))
  names = set(extractor.vocabulary) | {o for i in items for o in i.present + i.absent}
  return annotations.Annotations(str(path), items, tuple(sorted(names)), skipped)


def _examples(config, source, split):
  return Examples(source, config.seed, split, config.image_size, config.num_affirmative,
                  config.num_negcap, config.num_absent, config.paraphraser or None,
                  config.paraphraser_batched)


def write_eval(examples, eval_dir, name, progress=True):
  """The three NegBench CSVs; returns (number of images, tag counter, skipped)."""
  from tqdm import tqdm
  image_dir = os.path.join(eval_dir, "images")
  os.makedirs(image_dir, exist_ok=True)
  mcq_rows, retrieval_rows, negated_rows = [], [], []
  counts, skipped = collections.Counter(), []
  for index in tqdm(range(len(examples.source)), desc="eval images", disable=not progress):
    try:
      key, image, ann = examples.annotate(index)
      if isinstance(examples.source, ShapesWorld):
        from PIL import Image
        rel = os.path.join("images", f"{key}.png")
        Image.fromarray(examples.load(key, image)).save(os.path.join(eval_dir, rel),
                                                        optimize=False)
      else:  # real photos stay where they are; the CSV points at them
        path = examples.source.annotations.items[index].image_path
        examples.load(key, lambda: annotations.check_image(path))
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(eval_dir))
    except records.Skip as e:
      skipped.append(e.args)
      continue
    counts.update(tags(ann))
    mcq_rows.append([rel] + [c.text for c in ann.mcq] + [ann.answer, ann.answer_type]
                    + [c.kind for c in ann.mcq])
    retrieval_rows.append([rel, repr([c.text for c in ann.affirmative])])
    negated_rows.append([rel, repr([c.text for c in ann.negcap])])
  n = len(captions.MCQ_TYPES) + 1
  _write_csv(os.path.join(eval_dir, f"{name}_val_mcq.csv"),
             ["image_path"] + [f"caption_{i}" for i in range(n)]
             + ["correct_answer", "correct_answer_template"]
             + [f"caption_{i}_type" for i in range(n)], mcq_rows)
  for file, rows in ((f"{name}_val_retrieval.csv", retrieval_rows),
                     (f"{name}_val_negated_retrieval.csv", negated_rows)):
    _write_csv(os.path.join(eval_dir, file), ["filepath", "captions"], rows)
  return len(mcq_rows), counts, skipped


def _write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)


def default_config(source="shapes", **overrides):
  """Every knob of `build`; configs/data/*.py return this for their source."""
  c = ml_collections.ConfigDict()
  c.source = source  # "shapes", "coco", "csv" or "captions"
  c.name = {"shapes": "shapes", "coco": "coco"}.get(source, "custom")  # file name prefix
  c.out = ""  # required: output directory
  c.seed = 0
  c.image_size = 64 if source == "shapes" else 224  # stored (square) image side
  c.train_size = 50_000 if source == "shapes" else -1  # -1: every annotated image
  c.eval_size = 3_000 if source == "shapes" else -1
  c.shards = 32  # fixed index ranges: the output does not depend on `workers`
  c.workers = 0  # processes writing shards; 0: one per CPU
  c.num_affirmative = 2  # affirmative captions per image (retrieval set, training)
  c.num_negcap = 3  # NegCap captions per image
  c.num_absent = 4  # absent objects per image (given ones first, then sampled)
  c.paraphraser = ""  # "package.module:function", str -> str; "" = templates only
  c.paraphraser_batched = False  # the paraphraser takes and returns a list of str
  c.progress = True
  if source == "coco":
    c.train_annotations, c.train_images = "", ""  # instances_*.json and its image folder
    c.eval_annotations, c.eval_images = "", ""  # either split may be left empty
    c.check_images = True  # list missing image files as skipped while reading
  elif source == "csv":
    c.train_csv, c.eval_csv = "", ""
    c.image_root = ml_collections.config_dict.placeholder(str)  # None: the CSV's directory
    c.check_images = True
  elif source == "captions":  # image-text pairs: objects extracted from the captions
    c.train_csv, c.eval_csv = "", ""  # caption CSVs (negjax.data.official layout)
    c.image_column, c.caption_column, c.separator = "filepath", "title", "\t"
    c.image_root = ml_collections.config_dict.placeholder(str)
    c.check_images = True
    c.extractor = "vocabulary"  # or "chat": an OpenAI-compatible endpoint
    c.extractor_url = ""  # chat: API base, e.g. http://localhost:8000/v1
    c.extractor_model = ""  # chat: the served model's name
    c.extractor_batch = 16  # chat: captions per request
    c.extractor_cache = ""  # chat: JSON-lines answer cache ("" : none)
  elif source != "shapes":
    raise cli.UserError(f"unknown source {source!r}: use shapes, coco, csv or captions")
  c.update(overrides)
  return c


def fingerprint(config):
  """A short hash of the engine version and every setting that changes the output: a cache
  named by it is rebuilt when either changes."""
  c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  c = {k: v for k, v in c.items() if k not in ("out", "workers", "progress", "shards")}
  c["engine_version"] = ENGINE_VERSION
  return hashlib.sha1(json.dumps(c, sort_keys=True).encode()).hexdigest()[:8]


def build(config):
  """Builds everything under config.out; returns the summary (also DIR/summary.json).

  Works in a fresh folder beside DIR and swaps the result in only on success."""
  if not config.out:
    raise cli.UserError("set --config.out=DIR")
  captions.load_paraphraser(config.paraphraser, config.paraphraser_batched)  # fail fast
  train, val, skipped = sources(config)
  _check_inputs_outside(config.out, (train, val))
  work = _work_folder(config.out)
  try:
    summary = _build_into(work, config, train, val, skipped)
    _swap_in(work, config.out)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return summary


def _build_into(out, config, train, val, skipped):
  t0 = time.perf_counter()
  summary = {"name": config.name, "source": config.source, "seed": config.seed,
             "image_size": config.image_size, "engine_version": ENGINE_VERSION}
  if train is not None and len(train):
    results = records.write_split(
        _examples(config, train, TRAIN), len(train), os.path.join(out, "train"),
        config.name, "train", config.shards, config.workers or os.cpu_count(),
        config.progress)
    records.write_metadata(os.path.join(out, "train"), config.name,
                           {"train": results})
    train_skipped = [(k, r) for res in results for k, r in res.skipped]
    _require_output("train", len(train), sum(r.length for r in results), train_skipped)
    skipped += [(f"train {k}", r) for k, r in train_skipped]
    summary["train"] = {"records": sum(r.length for r in results),
                        "bytes": sum(r.num_bytes for r in results),
                        "counts": dict(sorted(sum((r.tags for r in results),
                                                  collections.Counter()).items()))}
  if val is not None and len(val):
    n, counts, eval_skipped = write_eval(_examples(config, val, EVAL),
                                      os.path.join(out, "eval"), config.name,
                                      config.progress)
    _require_output("eval", len(val), n, eval_skipped)
    skipped += [(f"eval {k}", r) for k, r in eval_skipped]
    summary["eval"] = {"images": n, "counts": dict(sorted(counts.items()))}
  if "train" not in summary and "eval" not in summary:
    raise cli.UserError("nothing to build: no usable train or eval items "
                        f"({len(skipped)} skipped)")
  summary["paths"] = {"train": "train", "eval": "eval", **{
      kind: os.path.join("eval", f"{config.name}_val_{kind}.csv")
      for kind in ("mcq", "retrieval", "negated_retrieval")}}
  summary["skipped_count"] = len(skipped)
  summary["skipped"] = [{"key": k, "reason": r} for k, r in skipped]
  summary["seconds"] = round(time.perf_counter() - t0, 2)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def _require_output(split, items, made, skipped):
  """A split whose every item was skipped is an error, not an empty data set."""
  if items and not made:
    reasons = "; ".join(f"{k}: {r}" for k, r in skipped[:3])
    raise cli.UserError(f"{split}: all {items} items were skipped, e.g. {reasons}")


def _check_inputs_outside(out, splits):
  """Input images inside DIR/train or DIR/eval would be replaced with the old output."""
  owned = tuple(os.path.join(os.path.abspath(out), name) + os.sep for name in OUTPUTS[1:])
  for source in splits:
    for item in source.annotations.items if isinstance(source, FileItems) else ():
      if os.path.abspath(item.image_path).startswith(owned):
        raise cli.UserError(f"input image {item.image_path} lies inside the output folder's "
                            f"train/ or eval/, which a build replaces: choose another "
                            f"--config.out")


def _work_folder(out):
  """A new folder beside DIR (one filesystem: the final renames are atomic), named with host
  and process id so that a later build can tell a killed build's folder from a live one's."""
  parent, base = os.path.split(os.path.abspath(out))
  prefix = f".{base}.partial-{socket.gethostname()}-"
  os.makedirs(parent, exist_ok=True)
  for stale in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*")):
    pid = os.path.basename(stale)[len(prefix):].split("-")[0]
    if pid.isdigit() and not _alive(int(pid)):
      print(f"removing {stale}, left by a killed build", file=sys.stderr)
      shutil.rmtree(stale, ignore_errors=True)
  return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    pass
  return True


def _swap_in(work, out):
  """Replaces DIR's outputs with the finished ones in `work`. summary.json leaves first and
  comes back last: a crash in between leaves no summary, and the folder reads as unbuilt."""
  os.makedirs(out, exist_ok=True)
  old = _work_folder(out)
  for name in OUTPUTS:
    if os.path.lexists(os.path.join(out, name)):
      os.rename(os.path.join(out, name), os.path.join(old, name))
  for name in reversed(OUTPUTS):
    if os.path.lexists(os.path.join(work, name)):
      os.rename(os.path.join(work, name), os.path.join(out, name))
  shutil.rmtree(old)


def print_summary(summary, file=sys.stdout):
  for split in ("train", "eval"):
    if split not in summary:
      continue
    part = summary[split]
    size = part.get("records", part.get("images"))
    print(f"{split}: {size} images", file=file)
    for k, v in part["counts"].items():
      print(f"  {k:32s} {v}", file=file)
  print(f"skipped: {summary['skipped_count']}", file=file)
  for s in summary["skipped"][:20]:
    print(f"  {s['key']}: {s['reason']}", file=file)
  if summary["skipped_count"] > 20:
    print("  ... (all listed in summary.json)", file=file)
  print(f"took {summary['seconds']} s", file=file)


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}: settings are --config.KEY=VALUE")
  print_summary(build(_CONFIG.value))


if __name__ == "__main__":
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "data config file")
  cli.run(main)
