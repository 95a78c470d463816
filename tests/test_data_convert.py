"""Conversion to ArrayRecord: the Beam pipeline writes what the single-process builder writes."""
import filecmp
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from negjax import cli
from negjax.data import convert, train_input
from test_data_official import Config, take, write_caption_csv, write_mcq_csv
from test_data_webdataset import write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**overrides):
  return cli.load_config(os.path.join(ROOT, "configs/data/convert.py"),
                         **dict(image_size=24, workers=2, **overrides))


def files(root):
  return sorted(f for f in os.listdir(root) if f != "summary.json")


def assert_same_output(a, b):
  assert files(a) == files(b) and len(files(a)) > 2
  for f in files(a):
    if f.endswith(".json"):  # dataset_info.json holds no time; compare as data
      with open(os.path.join(a, f)) as fa, open(os.path.join(b, f)) as fb:
        assert json.load(fa) == json.load(fb), f
    else:
      assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f


@pytest.fixture(scope="module")
def csv_inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("official")
  cap, mcq = str(root / "negcap.csv"), str(root / "negmcq.csv")
  write_caption_csv(cap, 5, extra_rows=[["imgs/missing.jpg", "gone", "[]"],
                                        ["imgs/000.jpg", "bad", "[oops"]])
  write_mcq_csv(mcq, 4)
  (root / "imgs" / "003.jpg").write_bytes(b"not a jpeg")  # unreadable: skipped, listed
  return root, dict(source="official_csv", input=cap, mcq_input=mcq, rows_per_shard=2)


def test_beam_matches_single_process_official_csv(csv_inputs, tmp_path):
  root, kw = csv_inputs
  local = convert.build(config(runner="local", out=str(tmp_path / "local"), **kw))
  beam = convert.build(config(runner="DirectRunner", out=str(tmp_path / "beam"), **kw))
  assert_same_output(tmp_path / "local", tmp_path / "beam")
  assert local["records"] == beam["records"] == {"captions": 4, "mcq": 3}
  assert local["skipped"] == beam["skipped"]
  skipped = sorted((os.path.basename(s["key"]), s["reason"]) for s in local["skipped"])
  assert [k for k, _ in skipped] == ["negcap.csv:5", "negcap.csv:7", "negcap.csv:8",
                                     "negmcq.csv:5"]  # bad jpeg, missing, bad literal, jpeg
  assert "003.jpg" in skipped[0][1] and "003.jpg" in skipped[3][1]
  assert "missing.jpg" in skipped[1][1] and "not a list literal" in skipped[2][1]
  # The records: resized, re-encoded once; captions and MCQs as in the CSVs.
  source = convert.training_source(str(tmp_path / "beam"), "mcq", 24)
  first = convert.decode(source._source[0])
  assert Image.open(io.BytesIO(first["image"])).size == (24, 24)
  assert first["mcq_options"] == tuple(f"option {k} of 0" for k in range(4))
  assert first["mcq_answer"] == 0 and first["caption"] == ""
  caps = convert.training_source(str(tmp_path / "beam"), "captions", 24)
  assert caps[1]["caption"] == "caption 1"
  assert convert.decode(caps._source[1])["negative_captions"] == ("no dog 1", "no cat 1")
  import tensorflow_datasets as tfds
  assert tfds.builder_from_directory(str(tmp_path / "beam")).info.splits[
      "captions"].num_examples == 4


def test_beam_matches_single_process_webdataset_from_the_command_line(tmp_path, monkeypatch):
  """Through `python -m` (Beam workers must unpickle the work by its module's name)."""
  monkeypatch.setenv("NEGJAX_CACHE", str(tmp_path / "cache"))
  pattern = write_shards(tmp_path / "wds", 3, 3, broken={"000010001.txt"})
  local = convert.build(config(source="webdataset", input=pattern, runner="local",
                               out=str(tmp_path / "local")))
  result = subprocess.run(
      [sys.executable, "-m", "negjax.data.convert", "--config", "configs/data/convert.py",
       f"--config.input={pattern}", f"--config.out={tmp_path / 'beam'}",
       "--config.runner=DirectRunner", "--config.workers=2", "--config.image_size=24"],
      cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "'captions': 8" in result.stdout and "skipped: 1" in result.stdout
  assert local["records"] == {"captions": 8, "mcq": 0} and local["skipped_count"] == 1
  assert_same_output(tmp_path / "local", tmp_path / "beam")


def test_train_from_converted_resumes_exactly(csv_inputs, tmp_path):
  root, kw = csv_inputs
  convert.build(config(runner="local", out=str(tmp_path / "out"), **kw))
  c = Config(source="converted", dir=str(tmp_path / "out"), text_length=12, workers=0)
  it = train_input.make_iterator(None, c, 2, 0, 24, (0, 1))
  batch = next(it)
  assert set(batch) == {"image", "caption_ids", "mcq_image", "mcq_ids", "mcq_answer"}
  state = it.get_state()
  expected = take(it, 3)
  fresh = train_input.make_iterator(None, c, 2, 0, 24, (0, 1))
  fresh.set_state(state)
  for a, b in zip(expected, take(fresh, 3)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_errors(tmp_path):
  with pytest.raises(cli.UserError, match="set --config.out"):
    convert.build(config(source="webdataset", input="x"))
  with pytest.raises(cli.UserError, match="1 of 1 shards missing"):
    convert.build(config(source="webdataset", input=str(tmp_path / "no.tar"),
                         out=str(tmp_path / "o")))
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "precious.txt").write_text("x")
  root = tmp_path
  write_caption_csv(str(root / "c.csv"), 1)
  with pytest.raises(cli.UserError, match="not a conversion output"):
    convert.build(config(source="official_csv", input=str(root / "c.csv"), runner="local",
                         out=str(tmp_path / "mine")))
  assert (tmp_path / "mine" / "precious.txt").exists()
