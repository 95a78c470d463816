"""Zero-shot classification (negjax.zero_shot): label files and folders, the shapes world's
labels, prompt ensembling and top-1 over multi-label images."""
import os

import numpy as np
import pytest
from PIL import Image

from negjax import cli, zero_shot
from negjax.data import make, shapes


def _png(path, colour=(200, 30, 30)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path)


def test_csv_rows_make_multi_label_images_with_paths_from_the_csv_folder(tmp_path):
  _png(str(tmp_path / "img" / "a.png"))
  _png(str(tmp_path / "img" / "b.png"))
  (tmp_path / "labels.csv").write_text(
      "image,label\nimg/a.png,red circle\nimg/b.png,blue star\nimg/a.png,blue star\n\n")
  ls = zero_shot.read(str(tmp_path / "labels.csv"))
  assert ls.classes == ["blue star", "red circle"]
  assert ls.paths == [str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "b.png")]
  assert ls.labels == [(0, 1), (0,)]
  assert ls.templates == zero_shot.ENSEMBLE_TEMPLATES


@pytest.mark.parametrize("text,message", [
    ("path,class\na.png,x\n", "must start with the header image,label"),
    ("image,label\na.png,\n", "row 2: need an image and a label"),
    ("image,label\na.png,x\nb.png,x\n", "at least 2 classes"),
])
def test_bad_csv_is_one_error_naming_the_file(tmp_path, text, message):
  (tmp_path / "z.csv").write_text(text)
  with pytest.raises(cli.UserError, match=message) as e:
    zero_shot.read(str(tmp_path / "z.csv"))
  assert "z.csv" in str(e.value)


def test_folder_of_class_folders(tmp_path):
  _png(str(tmp_path / "golden_retriever" / "1.jpg"))
  _png(str(tmp_path / "tabby" / "2.png"))
  (tmp_path / "tabby" / "notes.txt").write_text("not an image")
  ls = zero_shot.read(str(tmp_path), templates=("a photo of a {}.",))
  assert ls.classes == ["golden retriever", "tabby"]
  assert [os.path.basename(p) for p in ls.paths] == ["1.jpg", "2.png"]
  assert ls.labels == [(0,), (1,)]
  with pytest.raises(cli.UserError, match="exactly one"):
    zero_shot.read(str(tmp_path), templates=("a photo",))


def test_shapes_labels_are_the_objects_drawn_in_each_image(tmp_path):
  world = make.default_config("shapes", out=str(tmp_path), train_size=4, eval_size=6,
                              image_size=64, shards=1, workers=1, progress=False)
  make.build(world)
  ls = zero_shot.shapes_labels(world, str(tmp_path / "eval"))
  assert ls.templates == ("a photo of a {}",) and len(ls.classes) == 48
  assert [os.path.exists(p) for p in ls.paths] == [True] * 6
  for path, labels in zip(ls.paths, ls.labels):
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    for c in labels:  # each labelled object's colour is painted in its image
      rgb = np.asarray(shapes.COLOURS[ls.classes[c].split()[0]])
      assert (np.abs(pixels - rgb).max(1) < 8).sum() > 10, (path, ls.classes[c])


class _TextFeatures:
  """A stand-in encoder: a text's feature is a fixed random projection of its token ids."""
  context_length = 16

  def __init__(self):
    self.table = np.random.default_rng(0).normal(size=(49408, 6)).astype(np.float32)
    self.table[0] = 0  # padding adds nothing, however the batch is cut

  def text(self, ids):
    return self.table[np.asarray(ids)].sum(1)


def test_prompt_ensemble_is_the_unit_mean_of_unit_prompt_embeddings():
  enc = _TextFeatures()
  ls = zero_shot.LabelSet("x", [], [], ["red circle", "blue star"],
                          ("a photo of a {}.", "itap of a {}."))
  got = zero_shot.class_embeddings(enc, ls, batch_size=3)
  from negjax.tokenizer import tokenize
  for i, name in enumerate(ls.classes):
    f = [enc.text(tokenize([t.format(name)], context_length=16))[0] for t in ls.templates]
    f = [x / np.linalg.norm(x) for x in f]
    want = (f[0] + f[1]) / np.linalg.norm(f[0] + f[1])
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_top1_counts_any_of_an_images_labels():
  classes = np.eye(3, dtype=np.float32)
  images = np.array([[5, 1, 0], [0, 0.1, 3], [1, 2, 0], [0, 0, 1]], np.float32)
  # argmax: 0, 2, 1, 2
  assert zero_shot.top1(images, classes, [(0,), (1, 2), (0,), (0, 1)]) == 0.5
