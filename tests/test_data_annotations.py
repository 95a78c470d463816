"""COCO and CSV readers: good input parsed, bad entries listed, malformed files named."""
import json

import numpy as np
import pytest
from PIL import Image

from negjax.data import annotations


def write_coco(tmp_path, images=3, extra_annotations=(), drop_files=()):
  """A small instances_val2017.json-layout file plus its image files."""
  image_dir = tmp_path / "val2017"
  image_dir.mkdir(exist_ok=True)
  cats = [{"id": 1, "name": "person", "supercategory": "person"},
          {"id": 18, "name": "dog", "supercategory": "animal"},
          {"id": 53, "name": "apple", "supercategory": "food"},
          {"id": 62, "name": "chair", "supercategory": "furniture"},
          {"id": 90, "name": "toothbrush", "supercategory": "indoor"}]
  ims, anns = [], []
  rng = np.random.default_rng(0)
  for i in range(images):
    name = f"{i:012d}.jpg"
    ims.append({"id": 100 + i, "file_name": name, "width": 40 + i, "height": 30})
    if name not in drop_files:
      Image.fromarray(rng.integers(0, 255, (30, 40 + i, 3), dtype=np.uint8)).save(image_dir / name)
    for cat in (cats[i % 5]["id"], cats[(i + 2) % 5]["id"], cats[i % 5]["id"]):
      anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": cat,
                   "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0})
  anns += list(extra_annotations)
  path = tmp_path / "instances_val2017.json"
  path.write_text(json.dumps({"info": {}, "licenses": [], "images": ims, "annotations": anns,
                              "categories": cats}))
  return path, image_dir


def test_coco_layout_is_read(tmp_path):
  path, image_dir = write_coco(tmp_path)
  ann = annotations.read_coco(path, image_dir)
  assert ann.skipped == [] and len(ann.items) == 3
  assert ann.vocabulary == ("person", "dog", "apple", "chair", "toothbrush")
  assert ann.items[0].key == "100" and ann.items[0].present == ("person", "apple")
  assert ann.items[2].present == ("apple", "toothbrush")  # duplicates collapse, order kept
  image = annotations.load_image(ann.items[1].image_path, 16)
  assert image.shape == (16, 16, 3) and image.dtype == np.uint8


def test_coco_bad_entries_are_counted_and_listed(tmp_path):
  bad = [{"id": 900, "image_id": 100, "category_id": 999},
         {"id": 901, "image_id": 555, "category_id": 1}]
  path, image_dir = write_coco(tmp_path, images=4, extra_annotations=bad,
                               drop_files=("000000000002.jpg",))
  data = json.loads(path.read_text())
  data["images"].append({"id": 777, "file_name": "empty.jpg"})  # no annotations
  path.write_text(json.dumps(data))
  ann = annotations.read_coco(path, image_dir)
  reasons = dict(ann.skipped)
  assert reasons["annotation 900"] == "unknown category_id 999"
  assert reasons["annotation 901"] == "unknown image_id 555"
  assert reasons["image 777"] == "no objects"
  assert reasons["image 102"].startswith("missing image file")
  assert len(ann.skipped) == 4 and [i.key for i in ann.items] == ["100", "101", "103"]


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d.pop("categories"), "categories"),
    (lambda d: d["categories"][1].update(id="18"), r"categories\[1\]"),
    (lambda d: d["images"][0].pop("file_name"), r"images\[0\]"),
    (lambda d: d["annotations"][2].pop("category_id"), r"annotations\[2\]"),
])
def test_coco_malformed_names_file_and_key(tmp_path, mutate, where):
  path, image_dir = write_coco(tmp_path)
  data = json.loads(path.read_text())
  mutate(data)
  path.write_text(json.dumps(data))
  with pytest.raises(annotations.AnnotationError, match=f"instances_val2017.json: {where}"):
    annotations.read_coco(path, image_dir)


def test_coco_not_json(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text("{not json")
  with pytest.raises(annotations.AnnotationError, match="broken.json: cannot read as JSON"):
    annotations.read_coco(path, tmp_path)


def write_images(tmp_path, names):
  for name in names:
    Image.new("RGB", (20, 10), (200, 10, 10)).save(tmp_path / name)


def test_csv_is_read_and_bad_rows_listed(tmp_path):
  write_images(tmp_path, ["a.png", "b.png", "c.png", "d.png", "e.png"])
  (tmp_path / "objs.csv").write_text(
      "image_path,positive_objects,negative_objects\n"
      "a.png,dog; frisbee ,cat;horse\n"
      "b.png,person,\n"
      "c.png,,cat\n"
      "d.png,dog,dog\n"
      "missing.png,dog,\n"
      "\"e.png\",\"red car;blue bus\",\"green, striped cat\"\n")
  ann = annotations.read_csv(tmp_path / "objs.csv")
  assert [i.key for i in ann.items] == ["row 2", "row 3", "row 7"]
  assert ann.items[0].present == ("dog", "frisbee") and ann.items[0].absent == ("cat", "horse")
  assert ann.items[1].absent == ()
  assert ann.items[2].absent == ("green, striped cat",)
  assert ann.items[0].image_path == str(tmp_path / "a.png")
  reasons = dict(ann.skipped)
  assert reasons["row 4"] == "no positive objects"
  assert reasons["row 5"].startswith("objects both positive and negative")
  assert reasons["row 6"].startswith("missing image file")
  assert {"dog", "frisbee", "cat", "horse", "person", "red car"} <= set(ann.vocabulary)


def test_csv_without_negative_column(tmp_path):
  write_images(tmp_path, ["a.png"])
  (tmp_path / "p.csv").write_text("image_path,positive_objects\na.png,dog;cat\n")
  ann = annotations.read_csv(tmp_path / "p.csv")
  assert ann.items[0].present == ("dog", "cat") and ann.items[0].absent == ()


def test_csv_malformed_names_file_and_row(tmp_path):
  (tmp_path / "cols.csv").write_text("path,objects\na.png,dog\n")
  with pytest.raises(annotations.AnnotationError, match="cols.csv: header: missing column"):
    annotations.read_csv(tmp_path / "cols.csv")
  (tmp_path / "ragged.csv").write_text(
      "image_path,positive_objects,negative_objects\na.png,dog,cat\nb.png,dog,cat,extra\n")
  with pytest.raises(annotations.AnnotationError, match="ragged.csv: row 3: expected 3 fields"):
    annotations.read_csv(tmp_path / "ragged.csv", check_images=False)


@pytest.mark.parametrize("mutate, where, what", [
    (lambda d: d["images"].append(dict(d["images"][0], file_name="other.jpg")),
     r"images\[3\]", "duplicate image id 100 \\(also at images\\[0\\]\\)"),
    (lambda d: d["images"].append(dict(d["images"][1], id=555)),
     r"images\[3\]", "duplicate file_name '000000000001.jpg' \\(also at images\\[1\\]\\)"),
    (lambda d: d["categories"].append({"id": 18, "name": "cat"}),
     r"categories\[5\]", "duplicate category id 18 \\(also at categories\\[1\\]\\)"),
])
def test_coco_duplicate_ids_are_refused(tmp_path, mutate, where, what):
  """Merged, a repeated id would give one image's labels to another."""
  path, image_dir = write_coco(tmp_path)
  data = json.loads(path.read_text())
  mutate(data)
  path.write_text(json.dumps(data))
  with pytest.raises(annotations.AnnotationError,
                     match=f"instances_val2017.json: {where}: {what}"):
    annotations.read_coco(path, image_dir)


def test_csv_image_listed_twice_is_refused(tmp_path):
  write_images(tmp_path, ["a.png", "b.png"])
  (tmp_path / "twice.csv").write_text(
      "image_path,positive_objects\na.png,dog\nb.png,cat\n./a.png,horse\n")
  with pytest.raises(annotations.AnnotationError,
                     match=r"twice.csv: row 4: duplicate image_path .*a.png' \(also at row 2\)"):
    annotations.read_csv(tmp_path / "twice.csv")
