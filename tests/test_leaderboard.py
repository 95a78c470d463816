"""Leaderboard: several models on the shapes eval files in one run. Each row equals that
model's own evaluation, models are in memory one at a time, images are decoded once per
image size (not once per model), a model added later is the only one evaluated, a model
that fails is a row with its error while the others still get numbers, and a SigLIP row
names its architecture."""
import csv
import json
import os
import shutil
import weakref

import jax
import numpy as np
import pytest
from flax import nnx

from negjax import cli, evaluate, leaderboard
from negjax.data import eval_input, make
from negjax.models import clip, siglip, weights

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "negbench.py")
BATCH = 16


def _config(**values):
  return cli.load_config(CONFIG, **values)


def _tiny(path, seed, overflow=False):
  model = clip.create(clip.get_config("negjax-tiny"), seed=seed)
  if overflow:  # finite weights whose image features are not: fails while evaluating
    model.visual.proj[...] = np.full(model.visual.proj[...].shape, 1e38, np.float32)
  weights.save_open_clip(model, str(path))
  return str(path)


def _read(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}


class Counter:
  """Counts image decodes (eval_input's open_image) and which models each shared encode
  served."""

  def __init__(self, monkeypatch):
    self.decodes, self.encodes = 0, []
    open_image, shared = eval_input.open_image, evaluate.encode_media_shared

    def counted_open(*args, **kwargs):
      self.decodes += 1
      return open_image(*args, **kwargs)

    def counted_shared(encs, *args, **kwargs):
      self.encodes.append(len(encs))
      return shared(encs, *args, **kwargs)
    monkeypatch.setattr(eval_input, "open_image", counted_open)
    monkeypatch.setattr(evaluate, "encode_media_shared", counted_shared)


class Resident:
  """Wraps load_model: at each load, how many models loaded before still have their
  weights in memory (one parameter array of each is watched)."""

  def __init__(self, monkeypatch):
    self.live, self.at_load = 0, []
    load = weights.load_model

    def watched(*args, **kwargs):
      self.at_load.append(self.live)
      model = load(*args, **kwargs)
      self.live += 1
      weakref.finalize(jax.tree.leaves(nnx.state(model, nnx.Param))[0], self._freed)
      return model
    monkeypatch.setattr(weights, "load_model", watched)

  def _freed(self):
    self.live -= 1


@pytest.fixture(scope="module")
def board(tmp_path_factory):
  """Shapes eval files, checkpoints (two random tiny models, one whose features overflow,
  one unreadable file, the packaged shapes-CLIP), and one leaderboard run over them."""
  tmp = tmp_path_factory.mktemp("leaderboard")
  make.build(make.default_config("shapes", out=str(tmp / "data"), train_size=0, eval_size=24,
                                 seed=3, workers=1, progress=False))
  root = str(tmp / "data" / "eval")
  ckpts = {"a": _tiny(tmp / "a.safetensors", 1), "b": _tiny(tmp / "b.safetensors", 2),
           "overflow": _tiny(tmp / "overflow.safetensors", 3, overflow=True)}
  (tmp / "broken.safetensors").write_bytes(b"not a checkpoint")
  ckpts["broken"] = str(tmp / "broken.safetensors")
  labels = [ckpts["a"], ckpts["b"] + "=negjax-tiny", "shapes", ckpts["broken"],
            ckpts["overflow"]]
  c = _config(checkpoints=",".join(labels), data_root=root, workdir=str(tmp / "board"),
              batch_size=BATCH)
  with pytest.MonkeyPatch.context() as mp:
    counter, resident = Counter(mp), Resident(mp)
    evaluate.run(c)
  sets = evaluate.read_files("", root)
  return dict(c=c, root=root, ckpts=ckpts, labels=labels, counter=counter, tmp=tmp,
              resident=resident,
              images=sum(len(ds.paths) for ds in sets.values()), files=len(sets))


def test_rows_equal_each_model_evaluated_alone(board):
  columns, rows = _read(os.path.join(board["c"].workdir, "leaderboard.csv"))
  assert list(rows) == board["labels"]
  assert columns[:2] == ["model", "architecture"] and columns[-1] == "error"
  names = set()
  alone = {board["labels"][0]: board["ckpts"]["a"], "shapes": leaderboard.PACKAGED["shapes"]}
  for label, path in alone.items():
    want = evaluate.official_names(evaluate.evaluate_files(
        weights.load_model(path), None, board["root"], batch_size=BATCH, progress=False))
    want = {k: evaluate._format(v) for k, v in want.items() if isinstance(v, float)}
    got = {k: v for k, v in rows[label].items() if k not in ("model", "architecture", "error")}
    assert got == want, label
    assert rows[label]["error"] == ""
    names |= set(want)
  assert set(columns[2:-1]) == names  # official names, e.g. shapes-negated-...recall@5
  assert "shapes-negated-image_retrieval_recall@5" in names
  assert "shapes_val_mcq-negative_accuracy" in names
  assert rows["shapes"]["architecture"] == "negjax-shapes"
  assert rows[board["labels"][1]]["architecture"] == "negjax-tiny"
  md = open(os.path.join(board["c"].workdir, "leaderboard.md")).read().splitlines()
  assert len(md) == 2 + len(rows) and md[0].startswith("| model | architecture |")
  for figure in ("leaderboard_mcq.png", "leaderboard_retrieval.png"):
    assert os.path.getsize(os.path.join(board["c"].workdir, figure)) > 0


def test_failed_models_are_rows_with_their_error(board):
  _, rows = _read(os.path.join(board["c"].workdir, "leaderboard.csv"))
  broken, overflow = rows[board["ckpts"]["broken"]], rows[board["ckpts"]["overflow"]]
  assert "broken.safetensors: not a readable safetensors file" in broken["error"]
  assert "non-finite (NaN/Inf) features" in overflow["error"]  # found while evaluating
  for row in (broken, overflow):
    assert "\n" not in row["error"]
    assert all(v == "" for k, v in row.items() if k.startswith("shapes"))
  assert rows["shapes"]["shapes_val_mcq-total_accuracy"] != ""


def test_images_are_decoded_once_per_image_size(board):
  # tiny models take 32 px, the shapes-CLIP 64 px: two decodes of each image, not five
  counter = board["counter"]
  assert counter.decodes == board["images"] * 2
  # one model at a time: a, b and the shapes-CLIP on every file; the broken file never
  # loads; the overflowing model fails on the first file and is not encoded again
  assert counter.encodes == [1] * (3 * board["files"] + 1)
  assert not [p for p in os.listdir(board["c"].workdir) if p.startswith("media_cache")]


def test_one_model_in_memory_at_a_time(board):
  # five loads (the broken file's fails inside load_model); before each, no earlier
  # model's weights are still alive
  assert board["resident"].at_load == [0] * len(board["labels"])


def test_adding_a_model_evaluates_only_that_one(board, monkeypatch, tmp_path):
  workdir = str(tmp_path / "board")
  shutil.copytree(board["c"].workdir, workdir)
  _, before = _read(os.path.join(workdir, "leaderboard.csv"))
  new = _tiny(tmp_path / "c.safetensors", 4)
  kept = board["labels"][:3]  # the models that failed are left out (a rerun retries them)
  c = _config(**dict(board["c"], workdir=workdir, checkpoints=",".join(kept + [new])))
  counter = Counter(monkeypatch)
  evaluate.run(c)
  assert counter.encodes == [1] * board["files"]  # the new model alone, file by file
  assert counter.decodes == board["images"]
  _, after = _read(os.path.join(workdir, "leaderboard.csv"))
  assert list(after) == kept + [new]
  for label in kept:
    assert after[label] == before[label]
  assert after[new]["error"] == "" and after[new]["shapes_val_mcq-total_accuracy"] != ""
  # the same command again: nothing is encoded
  counter = Counter(monkeypatch)
  evaluate.run(c)
  assert counter.encodes == [] and counter.decodes == 0


def test_checkpoint_names(tmp_path):
  odd = tmp_path / "lr=1e-8.safetensors"
  odd.write_bytes(b"")
  entries = leaderboard.parse_checkpoints(
      f"openai:ViT-B-32, shapes,x.pt=ViT-B-32-quickgelu,{odd}", str(tmp_path))
  assert [(e.name, e.arch) for e in entries] == [
      ("openai:ViT-B-32", None), (leaderboard.PACKAGED["shapes"], None),
      ("x.pt", "ViT-B-32-quickgelu"), (str(odd), None)]
  assert len({e.folder for e in entries}) == 4
  for twice in ("shapes,shapes", f"shapes,{leaderboard.PACKAGED['shapes']}"):
    with pytest.raises(cli.UserError, match="given twice"):
      leaderboard.parse_checkpoints(twice, str(tmp_path))
  assert len(leaderboard.parse_checkpoints("shapes,shapes=negjax-shapes", str(tmp_path))) == 2
  with pytest.raises(cli.UserError, match="not NAME or NAME=ARCH"):
    leaderboard.parse_checkpoints("x.pt=", str(tmp_path))
  with pytest.raises(cli.UserError, match="not both"):
    evaluate.check_config(_config(checkpoint="x.pt", checkpoints="shapes"))


def test_siglip_row_names_its_architecture(board, tmp_path):
  """A SigLIP folder (written here without transformers: config.json, safetensors and a
  word-level tokenizer.json) in a leaderboard: its row gets numbers and its architecture's
  name, not "custom"."""
  from safetensors.numpy import save_file
  from tokenizers import Tokenizer, models, pre_tokenizers
  config = siglip.ARCHITECTURES["siglip-tiny"]
  folder = tmp_path / "siglip_tiny"
  folder.mkdir()
  save_file(siglip.state_dict(siglip.create(config, seed=0)), str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps(
      {"model_type": "siglip", **siglip.hf_config_dict(config)}))
  words = ["<pad>", "<eos>", "<unk>", "a", "no", "circle", "square", "triangle", "red", "blue"]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(folder / "tokenizer.json"))
  c = _config(checkpoints=f"{folder},shapes", data_root=board["root"],
              workdir=str(tmp_path / "board"), batch_size=BATCH)
  evaluate.run(c)
  _, rows = _read(os.path.join(c.workdir, "leaderboard.csv"))
  row = rows[str(folder)]
  assert row["error"] == "" and row["shapes_val_mcq-total_accuracy"] != ""
  assert row["architecture"] == "siglip-tiny"
  # shapes no released model has are spelled out; released ones keep their names
  other = config.replace(vision_layers=3)
  assert siglip.architecture_name(other) == "siglip-w64-d3-p8-32"
  for name in ("siglip-so400m-patch14-384", "siglip2-base-patch16-naflex"):
    assert siglip.architecture_name(siglip.ARCHITECTURES[name]) == name
