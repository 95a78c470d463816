"""Zero-shot classification: does the model still name what it sees?

Negation fine-tuning can cost a CLIP what it knew; the official evaluation reports ImageNet
zero-shot top-1 next to NegBench for this reason. Each class becomes text prompts (one, or
an ensemble: the mean of the prompts' unit embeddings, made unit again), each image goes to
the class with the most similar prompt embedding, and top-1 accuracy counts an image as
right when that class is one of its labels (an image may have several: the shapes world's
images hold 1-4 objects, and a user CSV may list an image on more than one row).

Label sources (`read`):
  * a CSV with header `image,label`, one row per (image, label); relative image paths are
    taken from the CSV's folder;
  * an ImageNet-style folder: ROOT/CLASS/*.jpg|png|..., class names from the folder names
    (underscores read as spaces);
  * the shapes world (`shapes_labels`): every eval image's present objects, classes all
    48 "colour shape" names, prompt "a photo of a {colour} {shape}".
"""
import csv
import dataclasses
import os

import numpy as np

from negjax import cli

SHAPES_TEMPLATES = ("a photo of a {}",)
# A few of CLIP's ImageNet prompts (Radford et al. 2021), for user data.
ENSEMBLE_TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.",
                      "a photo of the small {}.", "a cropped photo of a {}.", "itap of a {}.")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class LabelSet:
  source: str  # the file or folder (or "shapes world") the labels come from
  paths: list  # image paths
  labels: list  # per image: tuple of class indices
  classes: list  # class names, as they go into the prompts
  templates: tuple  # prompts with one "{}" for the class name


def read(source: str, templates=()) -> LabelSet:
  """Labels from a CSV of image,label rows or a folder of class folders."""
  source = os.path.expanduser(source)
  if os.path.isdir(source):
    return _from_folders(source, tuple(templates) or ENSEMBLE_TEMPLATES)
  if not os.path.isfile(source):
    raise cli.UserError(f"eval.zero_shot: no such file or folder: {source}")
  return _from_csv(source, tuple(templates) or ENSEMBLE_TEMPLATES)


def _from_csv(path, templates):
  root = os.path.dirname(os.path.abspath(path))
  by_image = {}
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    if header[:2] != ["image", "label"]:
      raise cli.UserError(f"{path}: zero-shot CSV must start with the header image,label "
                          f"(got {','.join(header) or 'nothing'})")
    for line, row in enumerate(reader, start=2):
      if not row or not any(c.strip() for c in row):
        continue
      if len(row) < 2 or not row[0].strip() or not row[1].strip():
        raise cli.UserError(f"{path}, row {line}: need an image and a label, got {row!r}")
      image = os.path.join(root, os.path.expanduser(row[0].strip()))
      by_image.setdefault(image, []).append(row[1].strip())
  if not by_image:
    raise cli.UserError(f"{path}: no image,label rows")
  return _label_set(path, by_image, templates)


def _from_folders(root, templates):
  by_image = {}
  for name in sorted(os.listdir(root)):
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
      continue
    for file in sorted(os.listdir(folder)):
      if file.lower().endswith(IMAGE_SUFFIXES):
        by_image.setdefault(os.path.join(folder, file), []).append(name.replace("_", " "))
  if not by_image:
    raise cli.UserError(f"{root}: no class folders with images ({', '.join(IMAGE_SUFFIXES)})")
  return _label_set(root, by_image, templates)


def _label_set(source, by_image, templates):
  classes = sorted({label for labels in by_image.values() for label in labels})
  if len(classes) < 2:
    raise cli.UserError(f"{source}: zero-shot classification needs at least 2 classes, "
                        f"found {classes}")
  _check_templates(templates)
  index = {c: i for i, c in enumerate(classes)}
  return LabelSet(source, list(by_image),
                  [tuple(sorted({index[c] for c in labels})) for labels in by_image.values()],
                  classes, templates)


def _check_templates(templates):
  bad = [t for t in templates if t.count("{}") != 1]
  if bad or not templates:
    raise cli.UserError(f"eval.zero_shot_templates: each prompt needs exactly one {{}} for "
                        f"the class name, got {list(bad or templates)}")


def shapes_labels(shapes_config, eval_root: str, templates=()) -> LabelSet:
  """The shapes world's eval images labelled with their present objects (the world is a
  pure function of its config, so the labels are exact)."""
  from negjax.data import make, shapes
  world = make.sources(shapes_config)[1]
  paths, labels = [], []
  index = {c: i for i, c in enumerate(shapes.OBJECTS)}
  for i in range(len(world)):
    key, _, present, _ = world.get(i, shapes_config.image_size)
    paths.append(os.path.join(eval_root, "images", f"{key}.png"))
    labels.append(tuple(sorted(index[name] for name in present)))
  templates = tuple(templates) or SHAPES_TEMPLATES
  _check_templates(templates)
  return LabelSet("shapes world", paths, labels, list(shapes.OBJECTS), templates)


def class_embeddings(enc, label_set: LabelSet, batch_size: int) -> np.ndarray:
  """[classes, D] unit vectors: each class's prompts embedded, made unit, averaged, made
  unit again (prompt ensembling)."""
  from negjax import evaluate
  prompts = [t.format(c) for c in label_set.classes for t in label_set.templates]
  text = _unit(evaluate.encode_texts(enc, prompts, batch_size))
  return _unit(text.reshape(len(label_set.classes), len(label_set.templates), -1).mean(1))


def top1(image_features, class_features, labels) -> float:
  """Share of images whose most similar class is one of their labels."""
  predicted = np.argmax(_unit(image_features) @ class_features.T, axis=1)
  return float(np.mean([p in ls for p, ls in zip(predicted, labels)]))


def evaluate(model, label_set: LabelSet, batch_size=64, workers=0,
             max_skipped_fraction=None) -> dict:
  """{"zero_shot_top1", "num_images", "num_classes", "num_skipped", "skipped"}."""
  from negjax import evaluate as evaluator
  if max_skipped_fraction is None:
    max_skipped_fraction = evaluator.MAX_SKIPPED_FRACTION
  enc = evaluator.Encoders(model)
  missing = [{"path": p, "error": "file not found"} for p in label_set.paths
             if not os.path.exists(p)]
  evaluator.check_skipped(label_set.source, len(label_set.paths), missing, max_skipped_fraction)
  image, ok, skipped = evaluator.encode_media(enc, label_set.paths, batch_size,
                                              workers=workers)
  evaluator.check_skipped(label_set.source, len(label_set.paths), skipped,
                          max_skipped_fraction)
  classes = class_embeddings(enc, label_set, batch_size)
  evaluator.check_finite(label_set.source, image[ok], classes)
  labels = [ls for ls, good in zip(label_set.labels, ok) if good]
  return {"zero_shot_top1": top1(image[ok], classes, labels), "kind": "zero_shot",
          "num_images": int(ok.sum()), "num_classes": len(label_set.classes),
          "num_templates": len(label_set.templates), "num_skipped": len(skipped),
          "skipped": skipped}


def _unit(x):
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
