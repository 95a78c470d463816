"""Readers that turn COCO instance files and object CSVs into per-image object lists.

Both end in the same `Annotations` the caption engine consumes. Bad data is handled in two
ways: problems in single entries (unknown category id, image without objects, missing image
file) skip that entry and are listed in `skipped`; input that cannot be read as the format at
all, or that names an image or category twice (its labels would land on the wrong image),
raises `AnnotationError` naming the file and the row or key.

CSV layout (header row required, comma-separated, standard `csv` quoting):

  image_path,positive_objects,negative_objects
  imgs/0001.jpg,dog;frisbee,cat;horse
  imgs/0002.jpg,person,

`positive_objects` are present in the image, `negative_objects` (optional column, may be
empty) are known to be absent; both separated by `;`. Relative `image_path`s are resolved
against `image_root` (default: the CSV's directory). Absent objects not given are sampled
from the other objects named anywhere in the file, so `positive_objects` must list every one
of those the image shows (as COCO's instance labels do for its categories).
"""
import contextlib
import csv
import dataclasses
import json
import os

import numpy as np
from PIL import Image

SEPARATOR = ";"


class AnnotationError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Item:
  key: str  # COCO image id, or the CSV row number
  image_path: str
  present: tuple
  absent: tuple = ()  # known absent objects; may be empty


@dataclasses.dataclass
class Annotations:
  path: str
  items: list
  vocabulary: tuple  # every object name the source knows
  skipped: list  # of (key, reason)


def _require(cond, path, where, what):
  if not cond:
    raise AnnotationError(f"{path}: {where}: {what}")


def _unique(seen, key, path, where):
  """Records `key` (kind, value) as seen at `where`; a second sighting is an error."""
  _require(key not in seen, path, where, f"duplicate {key[0]} {key[1]!r} (also at {seen.get(key)})")
  seen[key] = where


def _exists(path, check):
  return not check or os.path.isfile(path)


def read_coco(json_path, image_dir, check_images=True):
  """Reads an `instances_*.json` file: one item per image, objects = its category names."""
  try:
    with open(json_path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise AnnotationError(f"{json_path}: cannot read as JSON: {e}") from e
  _require(isinstance(data, dict), json_path, "top level", "expected an object")
  for key in ("images", "annotations", "categories"):
    _require(isinstance(data.get(key), list), json_path, key, "missing or not a list")

  # A repeated id or file would attach one image's labels to another: refused, not merged.
  names, seen = {}, {}
  for i, c in enumerate(data["categories"]):
    ok = isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)
    _require(ok, json_path, f"categories[{i}]", "needs an integer 'id' and a string 'name'")
    _unique(seen, ("category id", c["id"]), json_path, f"categories[{i}]")
    names[c["id"]] = c["name"].strip()
  images = {}
  for i, im in enumerate(data["images"]):
    ok = isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(
        im.get("file_name"), str)
    _require(ok, json_path, f"images[{i}]", "needs an integer 'id' and a string 'file_name'")
    _unique(seen, ("image id", im["id"]), json_path, f"images[{i}]")
    _unique(seen, ("file_name", os.path.normpath(im["file_name"])), json_path, f"images[{i}]")
    images[im["id"]] = im["file_name"]

  skipped, objects = [], {}
  for i, a in enumerate(data["annotations"]):
    ok = isinstance(a, dict) and isinstance(a.get("image_id"), int) and isinstance(
        a.get("category_id"), int)
    _require(ok, json_path, f"annotations[{i}]",
             "needs integer 'image_id' and 'category_id'")
    key = f"annotation {a.get('id', i)}"
    if a["category_id"] not in names:
      skipped.append((key, f"unknown category_id {a['category_id']}"))
    elif a["image_id"] not in images:
      skipped.append((key, f"unknown image_id {a['image_id']}"))
    else:
      objects.setdefault(a["image_id"], {})[names[a["category_id"]]] = None

  items = []
  for image_id, file_name in images.items():
    path = os.path.join(image_dir, file_name)
    if not objects.get(image_id):
      skipped.append((f"image {image_id}", "no objects"))
    elif not _exists(path, check_images):
      skipped.append((f"image {image_id}", f"missing image file {path}"))
    else:
      items.append(Item(str(image_id), path, tuple(objects[image_id])))
  return Annotations(str(json_path), items, tuple(dict.fromkeys(names.values())), skipped)


def _split(field):
  return tuple(dict.fromkeys(o.strip() for o in (field or "").split(SEPARATOR) if o.strip()))


def read_csv(csv_path, image_root=None, check_images=True):
  """Reads the `image_path, positive_objects[, negative_objects]` CSV described above."""
  image_root = os.path.dirname(os.path.abspath(csv_path)) if image_root is None else image_root
  items, skipped, vocabulary, seen = [], [], {}, {}
  try:
    f = open(csv_path, newline="")
  except OSError as e:
    raise AnnotationError(f"{csv_path}: cannot open: {e}") from e
  with f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    for col in ("image_path", "positive_objects"):
      _require(col in header, csv_path, "header", f"missing column {col!r} (found {header})")
    try:
      for row in reader:
        where = f"row {reader.line_num}"
        _require(None not in row and None not in row.values(), csv_path, where,
                 f"expected {len(header)} fields")
        present, absent = _split(row["positive_objects"]), _split(row.get("negative_objects"))
        vocabulary.update(dict.fromkeys(present + absent))
        path = os.path.join(image_root, row["image_path"].strip())
        if row["image_path"].strip():  # one row per image: its objects must not be split
          _unique(seen, ("image_path", os.path.normpath(path)), csv_path, where)
        if not row["image_path"].strip():
          skipped.append((where, "empty image_path"))
        elif not present:
          skipped.append((where, "no positive objects"))
        elif set(present) & set(absent):
          skipped.append((where, f"objects both positive and negative: "
                                 f"{sorted(set(present) & set(absent))}"))
        elif not _exists(path, check_images):
          skipped.append((where, f"missing image file {path}"))
        else:
          items.append(Item(where, path, present, absent))
    except csv.Error as e:
      raise AnnotationError(f"{csv_path}: row {reader.line_num}: {e}") from e
  return Annotations(str(csv_path), items, tuple(vocabulary), skipped)


@contextlib.contextmanager
def _bomb_names_file(path):
  """PIL refuses an image of more than 2 * Image.MAX_IMAGE_PIXELS pixels (a decompression
  bomb) without naming it: re-raised as an OSError with the path, a skip like any bad file."""
  try:
    yield
  except Image.DecompressionBombError as e:
    raise OSError(f"{path}: {e}") from e


def check_image(path):
  """Reads only the header: OSError (naming the file) for a missing or unreadable image or a
  decompression bomb."""
  with _bomb_names_file(path), Image.open(path):
    pass


def load_image(path, size):
  """RGB uint8 (size, size, 3): shorter side resized to `size`, then centre-cropped."""
  with _bomb_names_file(path), Image.open(path) as im:
    im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that still covers size
    im = im.convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))
