"""`negjax.data.make` as a job: no lost output, errors before work, bad images named."""
import filecmp
import json
import os
import socket
import subprocess
import sys

import ml_collections
import pytest
from PIL import Image

from negjax import cli
from negjax.data import captions
from negjax.data import make
from negjax.data import records
from negjax.data import train_input
from test_data_records import ROOT, data_config, tiny_shapes  # pytest puts tests/ on sys.path


def _snapshot(out):
  """{relative path: bytes} of a build's output (summary.json without its wall time)."""
  files = {}
  for d, _, names in os.walk(out):
    for name in names:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, out)] = f.read()
  summary = json.loads(files.pop("summary.json"))
  summary.pop("seconds")
  return files, summary


def _leftovers(out):
  parent, base = os.path.split(os.path.abspath(out))
  return [n for n in os.listdir(parent) if n.startswith(f".{base}.")]


def test_failed_rebuild_keeps_the_previous_output(tmp_path, monkeypatch):
  out = tmp_path / "out"
  make.build(tiny_shapes(out, train_size=6, eval_size=3, shards=2))
  before = _snapshot(out)
  calls = []

  def encode_then_fail(example, encode=records.encode):
    calls.append(1)
    if len(calls) == 4:
      raise RuntimeError("disk full")
    return encode(example)

  monkeypatch.setattr(records, "encode", encode_then_fail)
  with pytest.raises(RuntimeError, match="disk full"):
    make.build(tiny_shapes(out, train_size=6, eval_size=3, shards=2, seed=1))
  assert _snapshot(out) == before
  assert _leftovers(out) == []
  # A first build that fails leaves no output folder at all.
  calls.clear()
  with pytest.raises(RuntimeError, match="disk full"):
    make.build(tiny_shapes(tmp_path / "new", train_size=6, eval_size=3, shards=2))
  assert not os.path.exists(tmp_path / "new") and _leftovers(tmp_path / "new") == []


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_next_build_removes_a_killed_builds_folder(tmp_path):
  host = socket.gethostname()
  killed = tmp_path / f".out.partial-{host}-{_dead_pid()}-abc"
  live = tmp_path / f".out.partial-{host}-{os.getpid()}-def"  # a build still running
  for d in (killed, live):
    (d / "train").mkdir(parents=True)
    (d / "train" / "half-written").write_bytes(b"x")
  make.build(tiny_shapes(tmp_path / "out", train_size=3, eval_size=2, shards=1))
  assert not killed.exists() and live.exists()
  assert len(records.training_source(tmp_path / "out" / "train")) == 3


def returns_number(text):
  """A broken paraphraser, importable by path."""
  return 42


@pytest.mark.parametrize("spec, match", [
    ("test_data_captions:shoutt", "cannot import paraphraser 'test_data_captions:shoutt'"),
    ("no_such_module:fn", "cannot import paraphraser 'no_such_module:fn'"),
    ("test_data_build:returns_number", "returned 42 for 'a photo of a red circle'"),
    ("test_data_captions:shout_all", "must return a non-empty str"),  # batched, not flagged
])
def test_bad_paraphraser_is_an_error_before_any_work(tmp_path, monkeypatch, spec, match):
  out = tmp_path / "out"
  make.build(tiny_shapes(out, train_size=3, eval_size=2, shards=1))
  before = _snapshot(out)
  monkeypatch.setattr(make, "sources", lambda config: pytest.fail("work started"))
  with pytest.raises(captions.ParaphraserError, match=match):
    make.build(tiny_shapes(out, train_size=3, eval_size=2, shards=1, paraphraser=spec))
  assert _snapshot(out) == before and _leftovers(out) == []


def _write_images(root, sizes):
  for name, size in sizes.items():
    Image.new("RGB", size, (10, 200, 10)).save(root / name)


def test_split_whose_every_item_is_skipped_is_an_error(tmp_path):
  _write_images(tmp_path, {"a.png": (12, 12), "b.png": (12, 12)})
  (tmp_path / "ok.csv").write_text("image_path,positive_objects\na.png,dog\nb.png,cat\n")
  (tmp_path / "gone.csv").write_text("image_path,positive_objects\nx.png,dog\ny.png,cat\n")
  config = data_config("csv", out=str(tmp_path / "out"), train_csv=str(tmp_path / "ok.csv"),
                       image_size=8, shards=1, workers=1)
  make.build(config)
  before = _snapshot(tmp_path / "out")
  config.train_csv, config.check_images = str(tmp_path / "gone.csv"), False
  with pytest.raises(cli.UserError, match="train: all 2 items were skipped, e.g. row 2: "
                                          "cannot read image: .*x.png"):
    make.build(config)
  assert _snapshot(tmp_path / "out") == before


def test_decompression_bomb_is_skipped_and_named_in_train_and_eval(tmp_path, monkeypatch):
  """PIL refuses images over 2 * MAX_IMAGE_PIXELS without naming the file; the limit is
  lowered here so that a 30x30 image stands in for a huge one."""
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
  _write_images(tmp_path, {"a.png": (10, 10), "b.png": (12, 8), "huge.png": (30, 30)})
  (tmp_path / "objs.csv").write_text(
      "image_path,positive_objects\na.png,dog\nhuge.png,cat\nb.png,bird\n")
  config = data_config("csv", out=str(tmp_path / "out"), train_csv=str(tmp_path / "objs.csv"),
                       eval_csv=str(tmp_path / "objs.csv"), image_size=8, shards=1, workers=1)
  summary = make.build(config)
  assert summary["train"]["records"] == 2 and summary["eval"]["images"] == 2
  bombs = [s for s in summary["skipped"] if "huge.png" in s["reason"]]
  assert [s["key"] for s in bombs] == ["train row 3", "eval row 3"]
  for s in bombs:
    assert s["reason"].startswith(f"cannot read image: {tmp_path / 'huge.png'}: Image size")
  with open(tmp_path / "out" / "eval" / "custom_val_mcq.csv") as f:
    assert "huge.png" not in f.read()


def _run_make(*args):
  env = dict(os.environ, NEGJAX_DEBUG="0")
  return subprocess.run([sys.executable, "-m", "negjax.data.make", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True)


def test_command_line_errors_are_one_line_exit_2(tmp_path):
  r = _run_make("--config", "configs/data/csv.py", f"--config.out={tmp_path / 'out'}",
                f"--config.train_csv={tmp_path / 'missing.csv'}")
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.csv" in lines[0]
  r = _run_make("--config", "configs/data/shapes.py", f"--config.out={tmp_path / 'out'}",
                "--config.paraphraser=mymod.paraphrase")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "error: cannot import paraphraser 'mymod.paraphrase': No module named 'mymod'"]
  assert not os.path.exists(tmp_path / "out")


def test_shapes_cache_is_rebuilt_when_the_engine_or_settings_change(tmp_path, monkeypatch):
  """The cached world's folder name covers the engine version and every setting, so a
  changed caption engine never serves a world built by the old one."""
  built = []

  def fake_build(config):
    built.append(config.out)
    os.makedirs(config.out)
    with open(os.path.join(config.out, "summary.json"), "w") as f:
      f.write("{}")
    return {"skipped_count": 0, "skipped": [], "seconds": 0}

  monkeypatch.setattr(train_input, "CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(make, "build", fake_build)
  monkeypatch.setattr(make, "print_summary", lambda summary: None)
  data = ml_collections.ConfigDict({"dir": None, "shapes": make.default_config("shapes")})
  first = train_input.prepare(data, 0)
  assert train_input.prepare(data, 0) == first and len(built) == 1  # cached
  monkeypatch.setattr(make, "ENGINE_VERSION", make.ENGINE_VERSION + 1)
  second = train_input.prepare(data, 0)
  data.shapes.num_negcap = 2
  third = train_input.prepare(data, 0)
  assert len(built) == 3 and len({first, second, third}) == 3
