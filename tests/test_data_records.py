"""End to end: `negjax.data.make` output is deterministic and reads back exactly."""
import ast
import csv
import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

from negjax import cli
from negjax.data import annotations
from negjax.data import make
from negjax.data import records
from test_data_annotations import write_coco  # pytest puts tests/ on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(name, **overrides):
  return cli.load_config(os.path.join(ROOT, "configs/data", f"{name}.py"), progress=False,
                         **overrides)


def tiny_shapes(out, **overrides):
  kw = dict(out=str(out), train_size=18, eval_size=8, shards=4, workers=1)
  kw.update(overrides)
  return data_config("shapes", **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The same tiny shapes world built in one process, again, and with two workers."""
  root = tmp_path_factory.mktemp("shapes")
  configs = {"one": tiny_shapes(root / "one"), "again": tiny_shapes(root / "again"),
             "two": tiny_shapes(root / "two", workers=2)}
  return {k: (c, make.build(c)) for k, c in configs.items()}


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("other", ["again", "two"])
def test_identical_bytes_across_runs_and_worker_counts(built, other):
  a, b = built["one"][0].out, built[other][0].out
  files = _files(a)
  assert files == _files(b) and len(files) > 10
  for f in files:
    if f != "summary.json":  # holds the wall time
      assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f
  strip = lambda s: {k: v for k, v in s.items() if k != "seconds"}
  assert strip(built["one"][1]) == strip(built[other][1])


def test_other_seed_gives_other_data(built, tmp_path):
  config = tiny_shapes(tmp_path, seed=1)
  make.build(config)
  a, b = (records.training_source(os.path.join(c.out, "train")) for c in (built["one"][0], config))
  assert not np.array_equal(a[0]["image"], b[0]["image"])


def test_summary_counts(built):
  config, summary = built["one"]
  assert summary["train"]["records"] == 18 and summary["eval"]["images"] == 8
  assert summary["skipped_count"] == 0
  counts = summary["train"]["counts"]
  assert sum(v for k, v in counts.items() if k.startswith("negcap/")) == 3 * 18
  assert sum(v for k, v in counts.items() if k.startswith("mcq_option/")) == 4 * 18
  with open(os.path.join(config.out, "summary.json")) as f:
    assert json.load(f) == summary


def test_shards_round_trip_through_grain(built):
  import grain
  config, _ = built["one"]
  source = records.training_source(os.path.join(config.out, "train"))
  train, _, _ = make.sources(config)
  examples = make._examples(config, train, make.TRAIN)
  assert len(source) == 18
  for index in range(len(source)):
    got, (want, _) = source[index], examples(index)
    np.testing.assert_array_equal(got["image"], want["image"])
    assert got["key"] == want["key"] and got["mcq_answer"] == want["mcq_answer"]
    for name in ("affirmative", "negcap", "negcap_negated", "mcq_options", "mcq_types"):
      assert list(got[name]) == want[name], name
    assert got["present"].split(";") == want["present"]
    assert got["absent"].split(";") == want["absent"]
    types = list(got["mcq_types"])
    assert sorted(set(types)) == ["hybrid", "negative", "positive"]
    present, absent = set(want["present"]), set(want["absent"])
    assert present.isdisjoint(absent)
    for negated in got["negcap_negated"]:  # every NegCap caption negates an absent object
      assert negated in absent and negated not in present
  batch = grain.MapDataset.source(source).shuffle(seed=0).batch(4)[0]
  assert batch["image"].shape == (4, 64, 64, 3) and batch["mcq_options"].shape == (4, 4)


def test_fresh_mcq_draws_new_true_questions_from_the_records_objects(built):
  """data.fresh_mcq: a new MCQ per visit, its answer a true option of the weighted type."""
  from negjax.data import train_input
  from negjax.tokenizer import get_tokenizer
  config, _ = built["one"]
  source = records.training_source(os.path.join(config.out, "train"))
  fresh = train_input.TrainingExample(("negcap",), 24, 64, fresh_mcq=True,
                                      mcq_answer_weights=(0, 1, 0))
  decode = get_tokenizer().decode
  changed = 0
  for index in range(len(source)):
    example = source[index]
    absent, present = example["absent"].split(";"), example["present"].split(";")
    first, second = (fresh.random_map(example, np.random.default_rng((index, v))) for v in (0, 1))
    for out in (first, second):
      options = [decode(ids).strip() for ids in out["mcq_ids"]]
      true = options[out["mcq_answer"]]
      assert true.startswith("this image does not feature ")
      assert true.split(" feature ", 1)[1].split(" ", 1)[1] in absent
      for option in options:  # no negative option negates an absent object but the answer
        if option != true and option.startswith("this image does not feature "):
          assert option.split(" feature ", 1)[1].split(" ", 1)[1] in present
    changed += not np.array_equal(first["mcq_ids"], second["mcq_ids"])
  assert changed >= len(source) // 2
  import ml_collections
  stored_only = ml_collections.ConfigDict(dict(captions=("negcap",), text_length=24,
                                               fresh_mcq=False, mcq_answer_weights=(0, 1, 0)))
  with pytest.raises(ValueError, match="fresh_mcq"):
    train_input.make_iterator(os.path.join(config.out, "train"), stored_only, 4, 0, 64)


def test_source_imports_its_decoder_in_the_constructing_thread(built, run_without_torch):
  """tensorflow_datasets swaps `builtins.__import__` while it imports; done first in a Grain
  prefetch thread, that raced Orbax restore threads (a resumed run failed 2 times in 12)."""
  config, _ = built["one"]
  run_without_torch("from negjax.data import records\n"
                    "assert 'tensorflow_datasets' not in sys.modules\n"
                    "records.training_source(sys.argv[1])\n"
                    "assert 'tensorflow_datasets' in sys.modules\n",
                    os.path.join(config.out, "train"))


def test_tfds_reads_the_same_records(built):
  import tensorflow_datasets as tfds
  config, _ = built["one"]
  train_dir = os.path.join(config.out, "train")
  ds = tfds.builder_from_directory(train_dir).as_data_source()["train"]
  ours = records.training_source(train_dir)
  assert len(ds) == len(ours)
  for i in (0, 7, 17):
    np.testing.assert_array_equal(ds[i]["image"], ours[i]["image"])
    assert ds[i]["key"].decode() == ours[i]["key"]


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_eval_csvs_match_the_engine(built):
  config, _ = built["one"]
  eval_dir = os.path.join(config.out, "eval")
  _, val, _ = make.sources(config)
  examples = make._examples(config, val, make.EVAL)
  mcq = _rows(os.path.join(eval_dir, "shapes_val_mcq.csv"))
  retrieval = _rows(os.path.join(eval_dir, "shapes_val_retrieval.csv"))
  negated = _rows(os.path.join(eval_dir, "shapes_val_negated_retrieval.csv"))
  assert list(mcq[0]) == (["image_path"] + [f"caption_{i}" for i in range(4)]
                          + ["correct_answer", "correct_answer_template"]
                          + [f"caption_{i}_type" for i in range(4)])
  assert list(retrieval[0]) == list(negated[0]) == ["filepath", "captions"]
  assert len(mcq) == len(retrieval) == len(negated) == 8
  for index, (m, r, n) in enumerate(zip(mcq, retrieval, negated)):
    key, image, ann = examples.annotate(index)
    assert m["image_path"] == r["filepath"] == n["filepath"] == f"images/{key}.png"
    on_disk = np.asarray(Image.open(os.path.join(eval_dir, m["image_path"])))
    np.testing.assert_array_equal(on_disk, image())
    answer = int(m["correct_answer"])
    assert answer == ann.answer
    assert m["correct_answer_template"] == m[f"caption_{answer}_type"] == ann.answer_type
    assert [m[f"caption_{i}"] for i in range(4)] == [c.text for c in ann.mcq]
    assert [m[f"caption_{i}_type"] for i in range(4)] == [c.kind for c in ann.mcq]
    assert sum(c.is_true(ann.present) for c in ann.mcq) == 1
    assert ast.literal_eval(r["captions"]) == [c.text for c in ann.affirmative]
    negated_caps = ast.literal_eval(n["captions"])
    assert negated_caps == [c.text for c in ann.negcap] and len(negated_caps) == 3
    for c in ann.negcap:
      assert c.negated[0] in ann.absent and c.negated[0] not in ann.present


def test_answer_positions_are_shuffled(built):
  config, _ = built["one"]
  source = records.training_source(os.path.join(config.out, "train"))
  assert len({int(source[i]["mcq_answer"]) for i in range(len(source))}) > 1


def test_coco_layout_builds_with_skips_listed(tmp_path):
  bad = [{"id": 900, "image_id": 101, "category_id": 999}]
  path, image_dir = write_coco(tmp_path, images=6, extra_annotations=bad,
                               drop_files=("000000000004.jpg",))
  config = data_config("coco", out=str(tmp_path / "out"), train_annotations=str(path),
                       train_images=str(image_dir), eval_annotations=str(path),
                       eval_images=str(image_dir), image_size=24, shards=2, workers=1)
  summary = make.build(config)
  assert summary["train"]["records"] == 5 and summary["eval"]["images"] == 5
  reasons = [s["reason"] for s in summary["skipped"]]
  assert reasons.count("unknown category_id 999") == 2  # read once per split
  assert sum(r.startswith("missing image file") for r in reasons) == 2
  source = records.training_source(tmp_path / "out" / "train")
  vocabulary = {"person", "dog", "apple", "chair", "toothbrush"}
  for i in range(len(source)):
    ex = source[i]
    assert ex["image"].shape == (24, 24, 3)
    present, absent = set(ex["present"].split(";")), set(ex["absent"].split(";"))
    assert present and absent and present.isdisjoint(absent) and absent <= vocabulary
  eval_dir = tmp_path / "out" / "eval"
  for row in _rows(eval_dir / "coco_val_mcq.csv"):
    original = image_dir / os.path.basename(row["image_path"])
    assert os.path.samefile(eval_dir / row["image_path"], original)


def test_csv_input_builds_and_malformed_csv_errors(tmp_path):
  for name in ("a.png", "b.png", "c.png"):
    Image.new("RGB", (30, 20), (10, 200, 10)).save(tmp_path / name)
  (tmp_path / "train.csv").write_text(
      "image_path,positive_objects,negative_objects\n"
      "a.png,dog;frisbee,cat\nb.png,person,\nc.png,,cat\n")
  config = data_config("csv", out=str(tmp_path / "out"), train_csv=str(tmp_path / "train.csv"),
                       image_size=16, shards=1, workers=1)
  summary = make.build(config)
  assert summary["train"]["records"] == 2 and "eval" not in summary
  assert summary["skipped"] == [{"key": f"train {tmp_path / 'train.csv'}: row 4",
                                 "reason": "no positive objects"}]
  ex = records.training_source(tmp_path / "out" / "train")[0]
  assert ex["absent"].split(";")[0] == "cat"  # given absent objects come first
  (tmp_path / "bad.csv").write_text("image,objects\na.png,dog\n")
  config.train_csv = str(tmp_path / "bad.csv")
  with pytest.raises(annotations.AnnotationError, match="bad.csv: header"):
    make.build(config)


def test_nothing_to_build_is_an_error(tmp_path):
  (tmp_path / "empty.csv").write_text("image_path,positive_objects\nx.png,\n")
  config = data_config("csv", out=str(tmp_path / "out"), train_csv=str(tmp_path / "empty.csv"))
  with pytest.raises(cli.UserError, match="nothing to build"):
    make.build(config)


def test_paraphraser_is_applied_by_import_path(tmp_path):
  config = tiny_shapes(tmp_path, train_size=3, eval_size=3, shards=1,
                       paraphraser="test_data_captions:shout")
  make.build(config)
  for row in _rows(tmp_path / "eval" / "shapes_val_mcq.csv"):
    assert row["caption_0"] == row["caption_0"].upper() and row["caption_0_type"].islower()
  ex = records.training_source(tmp_path / "train")[0]
  assert all(c.isupper() for c in ex["negcap"]) and ex["present"].islower()


def test_rebuild_with_fewer_shards_replaces_the_old_ones(tmp_path):
  make.build(tiny_shapes(tmp_path, train_size=6, eval_size=2, shards=3))
  make.build(tiny_shapes(tmp_path, train_size=4, eval_size=2, shards=2))
  assert len(records.training_source(tmp_path / "train")) == 4
  stray = tmp_path / "train" / "shapes-train.array_record-00000-of-00009"
  stray.write_bytes(b"")
  with pytest.raises(ValueError, match="several builds mixed"):
    records.training_source(tmp_path / "train")
