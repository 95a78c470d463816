"""Official NegBench training CSVs: readers, malformed rows, two-stream training input."""
import csv
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from negjax import cli
from negjax.data import official, train_input
from negjax.tokenizer import tokenize

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200),
          (200, 30, 200), (120, 120, 120), (250, 250, 250)]


def jpeg_bytes(i, size=40):
  """A distinct small JPEG per i (colour and a bar position)."""
  a = np.zeros((size, size + 8, 3), np.uint8)
  a[:] = COLORS[i % len(COLORS)]
  a[:, (i * 3) % size:(i * 3) % size + 4] = 255 - np.array(COLORS[i % len(COLORS)])
  out = io.BytesIO()
  Image.fromarray(a).save(out, "JPEG", quality=95)
  return out.getvalue()


def write_images(folder, n):
  os.makedirs(folder, exist_ok=True)
  for i in range(n):
    with open(os.path.join(folder, f"{i:03d}.jpg"), "wb") as f:
      f.write(jpeg_bytes(i))
  return [f"imgs/{i:03d}.jpg" for i in range(n)]


def write_caption_csv(path, n, sep="\t", image_column="filepath", caption_column="title",
                      extra_rows=()):
  images = write_images(os.path.join(os.path.dirname(path), "imgs"), n)
  with open(path, "w", newline="") as f:
    w = csv.writer(f, delimiter=sep, lineterminator="\n")
    w.writerow([image_column, caption_column, "negative_captions"])
    for i, image in enumerate(images):
      w.writerow([image, f"caption {i}", repr([f"no dog {i}", f"no cat {i}"])])
    for row in extra_rows:
      w.writerow(row)
  return images


def write_mcq_csv(path, n, extra_rows=()):
  images = write_images(os.path.join(os.path.dirname(path), "imgs"), n)
  with open(path, "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(list(official.MCQ_COLUMNS) + ["correct_answer_template"])
    for i, image in enumerate(images):
      w.writerow([image] + [f"option {k} of {i}" for k in range(4)] + [i % 4, "negative"])
    for row in extra_rows:
      w.writerow(row)
  return images


def test_caption_csv_round_trip_with_malformed_rows(tmp_path):
  path = str(tmp_path / "negcap.csv")
  write_caption_csv(path, 5, extra_rows=[
      ["imgs/000.jpg", "too", "many", "fields"],
      ["imgs/001.jpg", "", "[]"],  # empty caption
      ["imgs/002.jpg", "x", "__import__('os').system('echo hi')"],  # not a literal
      ["imgs/003.jpg", "x", "[1, 2]"],  # not str
  ])
  table = official.read_captions(path)
  assert [r.caption for r in table.rows] == [f"caption {i}" for i in range(5)]
  assert table.rows[2].negative_captions == ("no dog 2", "no cat 2")
  assert table.rows[0].image_path == str(tmp_path / "imgs/000.jpg")
  lines = [k.rsplit(":", 1)[1] for k, _ in table.skipped]
  assert lines == ["7", "8", "9", "10"]
  reasons = " | ".join(r for _, r in table.skipped)
  assert "4 fields" in reasons and "empty title" in reasons and "not a list literal" in reasons
  assert "not a list of str" in reasons


def test_caption_csv_columns_and_separator_configurable(tmp_path):
  path = str(tmp_path / "c.csv")
  write_caption_csv(path, 3, sep=",", image_column="img", caption_column="caption")
  table = official.read_captions(path, "img", "caption", ",")
  assert len(table.rows) == 3 and not table.skipped
  with pytest.raises(official.FormatError, match=r"c.csv: missing column 'title'"):
    official.read_captions(path, "img", "title", ",")
  with pytest.raises(official.FormatError, match="missing column 'filepath', 'title'.*TAB"):
    official.read_captions(path)  # a comma file read with TAB: one column
  assert issubclass(official.FormatError, cli.UserError)


def test_mcq_csv_round_trip_with_malformed_rows(tmp_path):
  path = str(tmp_path / "negmcq.csv")
  write_mcq_csv(path, 4, extra_rows=[
      ["imgs/000.jpg", "a", "b", "c", "d", 4, "x"],  # answer out of range
      ["imgs/000.jpg", "a", "b", "c", "d", "two", "x"],
      ["imgs/000.jpg", "a", "", "c", "d", 1, "x"],
      ["imgs/000.jpg", "a"],
  ])
  table = official.read_mcq(path)
  assert [r.answer for r in table.rows] == [0, 1, 2, 3]
  assert table.rows[1].options == tuple(f"option {k} of 1" for k in range(4))
  assert len(table.skipped) == 4
  with open(tmp_path / "bad.csv", "w") as f:
    f.write("image_path,caption_0,caption_1,caption_2,caption_3\nx,a,b,c,d\n")
  with pytest.raises(official.FormatError, match="bad.csv: missing column 'correct_answer'"):
    official.read_mcq(str(tmp_path / "bad.csv"))


class Config(dict):
  __getattr__ = dict.__getitem__


def csv_config(tmp_path, n_cap=6, n_mcq=5, workers=0):
  cap, mcq = str(tmp_path / "negcap.csv"), str(tmp_path / "negmcq.csv")
  write_caption_csv(cap, n_cap)
  write_mcq_csv(mcq, n_mcq)
  return Config(source="official_csv", caption_csv=cap, mcq_csv=mcq, text_length=16,
                workers=workers)


def take(it, n):
  return [next(it) for _ in range(n)]


def test_two_streams_batch_layout(tmp_path):
  config = csv_config(tmp_path)
  it = train_input.make_iterator(None, config, 4, 0, 32, process=(0, 1))
  batch = next(it)
  assert batch["image"].shape == batch["mcq_image"].shape == (4, 32, 32, 3)
  assert batch["caption_ids"].shape == (4, 16) and batch["mcq_ids"].shape == (4, 4, 16)
  # Every caption is its own image's; every MCQ row is its own image's, answer included.
  caps = {tuple(tokenize([f"caption {i}"], 16)[0]): i for i in range(6)}
  seen = []
  for b in [batch] + take(it, 5):
    for ids, answer, opts in zip(b["caption_ids"], b["mcq_answer"], b["mcq_ids"]):
      seen.append(caps[tuple(ids)])
      j = [i for i in range(5) if (tokenize([f"option 0 of {i}"], 16) == opts[0]).all()]
      assert len(j) == 1 and answer == j[0] % 4
  assert sorted(seen[:6]) == list(range(6))  # one epoch: each row once


def test_multi_process_disjoint_complete_and_resume(tmp_path):
  config = csv_config(tmp_path, n_cap=8, n_mcq=8)
  key = lambda b: [(tuple(c), tuple(m.ravel())) for c, m in zip(b["caption_ids"], b["mcq_ids"])]
  whole = [key(b) for b in take(train_input.make_iterator(None, config, 4, 0, 16, (0, 1)), 4)]
  parts = [[key(b) for b in take(train_input.make_iterator(None, config, 4, 0, 16, (p, 2)), 4)]
           for p in range(2)]
  for step in range(4):
    merged = parts[0][step] + parts[1][step]
    assert sorted(merged) == sorted(whole[step])  # complete
    assert not set(parts[0][step]) & set(parts[1][step])  # disjoint
  # Resume mid-epoch: the state after 3 batches replays batches 4.. exactly.
  it = train_input.make_iterator(None, config, 4, 0, 16, (0, 1))
  take(it, 3)
  state = it.get_state()
  expected = take(it, 2)
  fresh = train_input.make_iterator(None, config, 4, 0, 16, (0, 1))
  fresh.set_state(state)
  for a, b in zip(expected, take(fresh, 2)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_one_stream_only(tmp_path):
  config = csv_config(tmp_path)
  config["mcq_csv"] = ""
  batch = next(train_input.make_iterator(None, config, 2, 0, 16, (0, 1)))
  assert set(batch) == {"image", "caption_ids"}
  config["mcq_csv"], config["caption_csv"] = str(tmp_path / "negmcq.csv"), ""
  batch = next(train_input.make_iterator(None, config, 2, 0, 16, (0, 1)))
  assert set(batch) == {"mcq_image", "mcq_ids", "mcq_answer"}


def test_mcq_loss_unnormalised_matches_official_formula():
  from negjax import losses
  rng = np.random.default_rng(0)
  image, options = rng.normal(size=(3, 5)) * 3, rng.normal(size=(3, 4, 5)) * 2
  answer, scale = np.array([0, 3, 1]), 7.0
  logits = scale * np.einsum("bd,bod->bo", image, options)  # no L2 normalisation
  logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))[:, None] \
      - logits.max(1, keepdims=True)
  expected = -logp[np.arange(3), answer].mean()
  got = losses.mcq_loss(image, options, answer, scale, normalize=False)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  normalised = losses.mcq_loss(image, options, answer, scale, normalize=True)
  assert abs(float(normalised) - expected) > 1e-3  # the option changes the loss


def test_loss_scores_mcq_rows_with_their_own_images():
  from flax import nnx
  from negjax import train_step
  from negjax.models import clip
  model = clip.CLIP(clip.get_config("negjax-tiny"), nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(1)
  size = model.config.image_size
  images = lambda: rng.integers(0, 255, (2, size, size, 3), dtype=np.uint8)
  ids = lambda *shape: rng.integers(1, 400, shape).astype(np.int32)
  caption_part = {"image": images(), "caption_ids": ids(2, 8)}
  mcq_part = {"mcq_image": images(), "mcq_ids": ids(2, 4, 8), "mcq_answer": np.array([1, 2])}
  _, both = train_step.loss_fn(params, graphdef, {**caption_part, **mcq_part}, 0.99, 0.01,
                               mcq_normalize=False)
  from negjax import losses
  encode = lambda images: model.encode_image(train_step.normalize_images(images))
  scale = model.temperature()
  np.testing.assert_allclose(both["contrastive_loss"], losses.contrastive_loss(
      encode(caption_part["image"]), model.encode_text(caption_part["caption_ids"]), scale),
      rtol=1e-5)
  options = model.encode_text(mcq_part["mcq_ids"].reshape(8, 8)).reshape(2, 4, -1)
  own, other = (losses.mcq_loss(encode(images), options, mcq_part["mcq_answer"], scale,
                                normalize=False)
                for images in (mcq_part["mcq_image"], caption_part["image"]))
  np.testing.assert_allclose(both["mcq_loss"], own, rtol=1e-4)  # the MCQ rows' own images
  assert abs(float(own) - float(other)) > 1e-4  # (which the check can tell apart)
