"""End to end: a tiny CLIP on a few images, library call and CLI, checked against NumPy;
and the guards: non-finite features, skips, inputs checked first, resumable workdir."""
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from negjax import cli, evaluate, metrics
from negjax.models import clip
from negjax.image import preprocess
from negjax.tokenizer import tokenize

WORDS = ["red", "blue", "green", "circle", "square", "no", "dog", "cat"]


def _normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """Seven images (one path missing), an MCQ file with option types, a retrieval file."""
  root = tmp_path_factory.mktemp("negbench")
  rng = np.random.default_rng(0)
  paths = []
  for i in range(7):
    rel = f"images/{i}.png"
    os.makedirs(root / "images", exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), np.uint8)).save(root / rel)
    paths.append(rel)
  paths[4] = "images/missing.png"
  types = ["positive", "negative", "hybrid"]
  with open(root / "shapes_val_mcq.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image_path"] + [f"caption_{i}" for i in range(4)]
               + ["correct_answer", "correct_answer_template"]
               + [f"caption_{i}_type" for i in range(4)])
    for i, p in enumerate(paths):
      options = [" ".join(rng.choice(WORDS, 3)) for _ in range(4)]
      option_types = [types[t] for t in rng.integers(0, 3, 4)]
      answer = int(rng.integers(0, 4))
      w.writerow([p] + options + [answer, option_types[answer]] + option_types)
  with open(root / "shapes_val_negated_retrieval.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["filepath", "captions"])
    for p in paths:
      captions = [" ".join(rng.choice(WORDS, 4)) for _ in range(int(rng.integers(1, 4)))]
      w.writerow([p, repr(captions)])
  model = clip.create(clip.get_config("negjax-tiny"), seed=1)
  return root, model


def _features(model, root, paths, texts):
  size = model.config.image_size
  images = np.stack([preprocess(Image.open(os.path.join(root, p)), size) for p in paths])
  image = np.asarray(model.encode_image(images))
  text = np.asarray(model.encode_text(tokenize(texts)))
  return _normalise(image), _normalise(text)


def test_evaluate_files_matches_numpy(bench):
  root, model = bench
  results = evaluate.evaluate_files(model, None, str(root), batch_size=3, progress=False,
                                    max_skipped_fraction=0.2)
  assert set(results) == {"shapes_val_mcq", "shapes_val_negated_retrieval"}

  from negjax.data import negbench
  mcq = negbench.read(str(root / "shapes_val_mcq.csv"), str(root))
  keep = [i for i, p in enumerate(mcq.paths) if os.path.exists(p)]
  image, text = _features(model, root, [mcq.paths[i] for i in keep],
                          [t for i in keep for t in mcq.options[i]])
  scores = np.einsum("bd,bod->bo", image, text.reshape(len(keep), 4, -1))
  chosen = scores.argmax(1)
  right = chosen == mcq.answer[keep]
  got = results["shapes_val_mcq"]
  assert got["total_accuracy"] == pytest.approx(right.mean())
  assert got["num_questions"] == len(keep) == 6
  for t, name in enumerate(metrics.TEMPLATES):
    sel = mcq.question_type[keep] == t
    if sel.any():
      assert got[f"{name}_accuracy"] == pytest.approx(right[sel].mean())
  wrong_types = [metrics.TYPE_NAMES[mcq.option_types[keep][j, chosen[j]]]
                 for j in np.flatnonzero(~right)]
  assert sum(sum(row.values()) for row in got["confusion"].values()) == len(wrong_types)
  assert got["num_skipped"] == 1
  assert got["skipped"][0]["path"].endswith("missing.png")

  ret = negbench.read(str(root / "shapes_val_negated_retrieval.csv"), str(root))
  keep = [i for i, p in enumerate(ret.paths) if os.path.exists(p)]
  owner = np.repeat(np.arange(len(keep)), [len(ret.captions[i]) for i in keep])
  image, text = _features(model, root, [ret.paths[i] for i in keep],
                          [c for i in keep for c in ret.captions[i]])
  s = text @ image.T
  pos = s[np.arange(len(owner)), owner]
  text_rank = (s > pos[:, None] + 1e-6).sum(1)
  best = np.array([s[owner == i, i].max() for i in range(len(keep))])
  image_rank = (s > best[None, :] + 1e-6).sum(0)
  got = results["shapes_val_negated_retrieval"]
  for k in (1, 5, 10):
    assert got[f"image_retrieval_recall@{k}"] == pytest.approx((text_rank < k).mean())
    assert got[f"text_retrieval_recall@{k}"] == pytest.approx((image_rank < k).mean())
  assert got["num_skipped"] == 1 and got["num_items"] == 6


def test_result_prefixes():
  assert evaluate.result_prefix("COCO_val_retrieval") == "coco"
  assert evaluate.result_prefix(
      "COCO_val_negated_retrieval_llama3.1_rephrased_affneg_true") == "coco-negated"
  assert evaluate.result_prefix("msr_vtt_retrieval") == "msrvtt"
  assert evaluate.result_prefix("msr_vtt_retrieval_rephrased_llama") == "msrvtt-negated"
  stem = "VOC2007_mcq_llama3.1_rephrased"
  assert evaluate.result_prefix(stem) == stem  # no official prefix: the stem
  flat = evaluate.official_names({"msr_vtt_retrieval": {
      "kind": "video_retrieval", "image_retrieval_recall@5": 0.5, "text_retrieval_recall@5": 0.25}})
  assert flat == {"msrvtt-video_retrieval_recall@5": 0.5, "msrvtt-text_retrieval_recall@5": 0.25}


def _sha256(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "negbench.py")


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "negjax.evaluate", *args], env=env,
                        capture_output=True, text=True, timeout=None)


def test_cli_writes_results(bench, tmp_path):
  root, model = bench
  from negjax.models.weights import save_open_clip
  ckpt = str(tmp_path / "tiny.safetensors")
  save_open_clip(model, ckpt)
  out = tmp_path / "out"
  # a space after the comma is not part of the second name
  r = _cli("--config", CONFIG, f"--config.checkpoint={ckpt}", f"--config.data_root={root}",
           "--config.files=shapes_val_mcq.csv, shapes_val_negated_retrieval.csv",
           f"--config.workdir={out}", "--config.batch_size=4",
           "--config.max_skipped_fraction=0.2")
  assert r.returncode == 0, r.stderr
  # every skip is counted on the console ...
  assert "shapes_val_mcq: skipped 1 of 7 questions" in r.stderr
  assert "shapes_val_negated_retrieval: skipped 1 of 7 items" in r.stderr
  doc = json.loads((out / "results.json").read_text())
  results = doc["results"]
  want = evaluate.evaluate_files(model, None, str(root), batch_size=3, progress=False,
                                 max_skipped_fraction=0.2)
  assert results["shapes_val_mcq"]["total_accuracy"] == pytest.approx(
      want["shapes_val_mcq"]["total_accuracy"])
  rows = dict(list(csv.reader(open(out / "results.csv")))[1:])
  assert float(rows["shapes-negated-image_retrieval_recall@1"]) == pytest.approx(
      want["shapes_val_negated_retrieval"]["image_retrieval_recall@1"], abs=1e-6)
  # ... and in results.csv
  assert rows["shapes_val_mcq-num_questions"] == "6"
  assert rows["shapes_val_mcq-num_skipped"] == "1"
  assert rows["shapes-negated-num_items"] == "6" and rows["shapes-negated-num_skipped"] == "1"
  assert (out / "mcq_accuracy.png").stat().st_size > 0
  # provenance: what made these numbers
  prov = doc["provenance"]
  assert prov["checkpoint"]["sha256"] == _sha256(ckpt)
  assert prov["checkpoint"]["bytes"] == os.path.getsize(ckpt)
  assert prov["checkpoint"]["path"] == os.path.abspath(ckpt)
  assert prov["architecture"] == "negjax-tiny" and prov["dtype"] == "float32"
  assert prov["negjax_version"] and prov["date"]
  assert prov["settings"]["tie_rule"] == "official"
  data = {d["key"]: d for d in prov["data"]}
  assert set(data) == set(results)
  for key in results:
    file = root / f"{key}.csv"
    assert data[key]["path"] == str(file) and data[key]["sha256"] == _sha256(file)
    assert data[key]["rows"] == 7


@pytest.mark.parametrize("args, message", [
    ([], r"--config is required"),
    (["--config", CONFIG, "--config.batch_sise=4"], r"batch_sise"),
    (["--config", CONFIG, "--config.checkpoint=x", "--config.batch_size=0"],
     r"batch_size must be an integer >= 1, got 0"),
    (["--config", CONFIG, "--config.checkpoint=x", "--config.tie_rule=random"],
     r"tie_rule must be one of official, optimistic, pessimistic"),
    (["--config", CONFIG, "--config.checkpoint=x", "--config.files=BAD"],
     r"bad_retrieval\.csv:3: captions cell is not a Python list literal"),
])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, args, message):
  bad = tmp_path / "bad_retrieval.csv"
  bad.write_text('filepath,captions\nimages/0.png,"[\'ok\']"\nimages/1.png,"open(\'x\')"\n')
  args = [a.replace("BAD", str(bad)) for a in args]
  r = _cli(*args, *([f"--config.workdir={tmp_path / 'out'}"] if args else []))
  assert r.returncode == 2
  assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
  assert re.search(message, r.stderr), r.stderr
  assert not (tmp_path / "out").exists()


def test_malformed_file_stops_with_its_name(bench, tmp_path):
  root, model = bench
  bad = tmp_path / "bad_retrieval.csv"
  bad.write_text('filepath,captions\nimages/0.png,"[\'ok\']"\nimages/1.png,"open(\'x\')"\n')
  with pytest.raises(ValueError, match=r"bad_retrieval\.csv:3"):
    evaluate.evaluate_files(model, [str(bad)], str(root), progress=False)


def _mcq_file(path, image_paths, seed=0):
  rng = np.random.default_rng(seed)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image_path"] + [f"caption_{i}" for i in range(4)]
               + ["correct_answer", "correct_answer_template"])
    for p in image_paths:
      w.writerow([p] + [" ".join(rng.choice(WORDS, 3)) for _ in range(4)] + [0, "negative"])
  return str(path)


def _nan_copy(model, param):
  """A fresh copy of `model` with one projection set to NaN (built in memory: the
  checkpoint loader refuses NaN weights)."""
  copy = clip.create(model.config, seed=1)
  owner, name = param.split(".")
  p = getattr(getattr(copy, owner), name)
  p[...] = jnp.full_like(p[...], jnp.nan)
  return copy


@pytest.mark.parametrize("param, message", [
    ("visual.proj", r"6 of 6 images/videos and 0 of 28 texts"),
    ("text.text_projection", r"0 of 6 images/videos and 28 of 28 texts"),
])
def test_non_finite_features_stop_with_file_and_count(bench, param, message):
  root, model = bench
  with pytest.raises(cli.UserError, match=r"shapes_val_mcq\.csv: .*non-finite .*" + message):
    evaluate.evaluate_files(_nan_copy(model, param), ["shapes_val_mcq.csv"], str(root),
                            batch_size=4, progress=False, max_skipped_fraction=0.2)


def test_file_with_nothing_scorable_is_an_error(bench, tmp_path):
  root, model = bench
  missing = _mcq_file(tmp_path / "gone_mcq.csv", ["nope/0.png", "nope/1.png"])
  with pytest.raises(cli.UserError, match=r"gone_mcq\.csv: nothing to score: none of its 2"):
    evaluate.evaluate_files(model, [missing], str(root), progress=False,
                            max_skipped_fraction=1.0)
  # files that exist but cannot be decoded: found while encoding, same error
  for i in range(2):
    (tmp_path / f"{i}.png").write_bytes(b"not a png")
  broken = _mcq_file(tmp_path / "broken_mcq.csv", ["0.png", "1.png"])
  with pytest.raises(cli.UserError, match=r"broken_mcq\.csv: nothing to score"):
    evaluate.evaluate_files(model, [broken], str(tmp_path), progress=False,
                            max_skipped_fraction=1.0)


def test_max_skipped_fraction(bench, tmp_path):
  root, model = bench
  with pytest.raises(cli.UserError, match=r"shapes_val_mcq\.csv: 1 of 7 media files cannot "
                     r"be read \(14\.3% > max_skipped_fraction=0\.01"):
    evaluate.evaluate_files(model, ["shapes_val_mcq.csv"], str(root), progress=False)
  got = evaluate.evaluate_files(model, ["shapes_val_mcq.csv"], str(root), progress=False,
                                max_skipped_fraction=0.15)
  assert got["shapes_val_mcq"]["num_questions"] == 6
  # an unreadable file that exists is only found while encoding: counted the same way
  shutil.copytree(root / "images", tmp_path / "images")
  (tmp_path / "images" / "3.png").write_bytes(b"not a png")
  shutil.copy(root / "shapes_val_mcq.csv", tmp_path)
  with pytest.raises(cli.UserError, match=r"2 of 7 media files cannot be read"):
    evaluate.evaluate_files(model, ["shapes_val_mcq.csv"], str(tmp_path), progress=False,
                            max_skipped_fraction=0.2)


def _config(**values):
  return cli.load_config(CONFIG, **values)


@pytest.fixture
def counted(monkeypatch):
  """Counts encode_media calls: proves what was (not) encoded."""
  calls = []
  original = evaluate.encode_media

  def encode_media(enc, paths, *args, **kwargs):
    calls.append(paths)
    return original(enc, paths, *args, **kwargs)
  monkeypatch.setattr(evaluate, "encode_media", encode_media)
  return calls


@pytest.fixture
def checkpoint(bench, tmp_path_factory):
  from negjax.models.weights import save_open_clip
  path = str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
  save_open_clip(bench[1], path)
  return path


def test_inputs_and_workdir_are_checked_before_encoding(bench, tmp_path, counted, checkpoint):
  root, _ = bench
  bad = tmp_path / "bad_retrieval.csv"
  bad.write_text('filepath,captions\nimages/0.png,"[\'ok\']"\nimages/1.png,"open(\'x\')"\n')
  c = _config(checkpoint=checkpoint, data_root=str(root), workdir=str(tmp_path / "out"),
              max_skipped_fraction=0.2,
              files=f"shapes_val_mcq.csv,shapes_val_negated_retrieval.csv,{bad}")
  with pytest.raises(evaluate.negbench.NegBenchFormatError, match=r"bad_retrieval\.csv:3"):
    evaluate.run(c)
  assert counted == [] and not (tmp_path / "out").exists()
  (tmp_path / "file").write_text("")
  c.update(files="shapes_val_mcq.csv", workdir=str(tmp_path / "file" / "out"))
  with pytest.raises(cli.UserError, match=r"workdir .*file/out: cannot write there"):
    evaluate.run(c)
  assert counted == []


def test_other_hosts_stop_when_process_0_cannot_use_the_workdir(bench, tmp_path, counted,
                                                                checkpoint, monkeypatch):
  """Multi-host: only process 0 opens the workdir; if it fails there, the others must stop
  too instead of waiting for it in the first collective."""
  from jax.experimental import multihost_utils
  root, _ = bench
  monkeypatch.setattr("jax.process_count", lambda: 2)
  monkeypatch.setattr("jax.process_index", lambda: 1)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", np.ones_like)  # 0 failed
  c = _config(checkpoint=checkpoint, data_root=str(root), workdir=str(tmp_path / "out"),
              max_skipped_fraction=0.2, files="shapes_val_mcq.csv")
  with pytest.raises(cli.UserError, match="process 0 stopped"):
    evaluate.run(c)
  assert counted == [] and not (tmp_path / "out").exists()


def test_results_are_kept_per_file_and_a_rerun_skips_them(bench, tmp_path, counted,
                                                          checkpoint, monkeypatch):
  root, _ = bench
  out = tmp_path / "out"
  c = _config(checkpoint=checkpoint, data_root=str(root), workdir=str(out),
              max_skipped_fraction=0.2, batch_size=4,
              files="shapes_val_mcq.csv,shapes_val_negated_retrieval.csv")
  # the second file fails (interrupted): the first one's results are on disk already
  original = evaluate.evaluate_retrieval
  monkeypatch.setattr(evaluate, "evaluate_retrieval", lambda *a: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    evaluate.run(c)
  first = json.loads((out / "results.json").read_text())["results"]
  assert list(first) == ["shapes_val_mcq"] and len(counted) == 1
  # rerun: only the missing file is encoded
  monkeypatch.setattr(evaluate, "evaluate_retrieval", original)
  results = evaluate.run(c)
  assert len(counted) == 2 and counted[1][0].endswith("0.png")
  assert results["shapes_val_mcq"] == first["shapes_val_mcq"]
  assert set(json.loads((out / "results.json").read_text())["results"]) == set(results)
  # once more: nothing to do
  assert evaluate.run(c) == results and len(counted) == 2
  # a changed CSV is evaluated again
  with open(root / "shapes_val_mcq.csv", "a") as f:
    f.write("\n")
  try:
    evaluate.run(c)
    assert len(counted) == 3
  finally:
    text = (root / "shapes_val_mcq.csv").read_text()
    (root / "shapes_val_mcq.csv").write_text(text[:-1])
  # another checkpoint (or setting) never overwrites these results
  other = tmp_path / "other.safetensors"
  from negjax.models.weights import save_open_clip
  save_open_clip(clip.create(clip.get_config("negjax-tiny"), seed=2), str(other))
  with pytest.raises(cli.UserError, match=r"holds results of another run \(checkpoint_sha256"):
    evaluate.run(_config(**dict(c, checkpoint=str(other))))
  with pytest.raises(cli.UserError, match=r"another run \(settings: .*optimistic"):
    evaluate.run(_config(**dict(c, tie_rule="optimistic")))
  assert len(counted) == 3


def test_tie_rule_reaches_the_retrieval_metric(bench, tmp_path):
  root, model = bench
  with open(tmp_path / "twins_retrieval.csv", "w", newline="") as f:  # two equal images
    w = csv.writer(f)
    w.writerow(["filepath", "captions"])
    w.writerows([[str(root / "images/0.png"), "['red dog']"],
                 [str(root / "images/0.png"), "['red dog']"]])
  got = {rule: evaluate.evaluate_files(model, [str(tmp_path / "twins_retrieval.csv")],
                                       progress=False, tie_rule=rule)["twins_retrieval"]
         for rule in ("optimistic", "pessimistic")}
  assert got["optimistic"]["image_retrieval_recall@1"] == 1.0
  assert got["pessimistic"]["image_retrieval_recall@1"] == 0.0


def test_same_stem_in_two_folders(bench, tmp_path):
  root, model = bench
  for folder, rows in (("a", [0, 1, 2]), ("b", [3, 5, 6])):
    os.makedirs(tmp_path / folder)
    _mcq_file(tmp_path / folder / "x_mcq.csv",
              [str(root / f"images/{i}.png") for i in rows], seed=len(folder))
  files = [str(tmp_path / "a" / "x_mcq.csv"), str(tmp_path / "b" / "x_mcq.csv")]
  results = evaluate.evaluate_files(model, files, progress=False)
  assert set(results) == {"a/x_mcq", "b/x_mcq"}
  for key in results:
    alone = evaluate.evaluate_files(model, [str(tmp_path / f"{key}.csv")], progress=False)
    assert results[key]["total_accuracy"] == alone["x_mcq"]["total_accuracy"]
  flat = evaluate.official_names(results)
  assert flat["a/x_mcq-num_questions"] == flat["b/x_mcq-num_questions"] == 3


def _write_video(path, levels):
  import av
  with av.open(str(path), "w") as out:
    stream = out.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    for level in levels:
      frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), level, np.uint8), format="rgb24")
      for packet in stream.encode(frame):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


def test_video_mcq_embeds_official_mean_of_frames(bench, tmp_path):
  """Video MCQ end to end: a video's embedding is the mean of the L2-normalised embeddings
  of the official frames (negbench.frame_indices), each through the video transform."""
  import av
  from negjax.data import negbench
  from negjax.image import preprocess_frame
  _, model = bench
  _write_video(tmp_path / "a.mp4", [10 * i for i in range(12)])
  _write_video(tmp_path / "b.mp4", [200 - 10 * i for i in range(12)])
  options = ["red dog", "blue cat", "no dog", "green"]
  with open(tmp_path / "msr_vtt_mcq.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image_path"] + [f"caption_{i}" for i in range(4)]
               + ["correct_answer", "correct_answer_template"])
    w.writerow(["a.mp4"] + options + [2, "negative"])
    w.writerow(["b.mp4"] + options + [1, "positive"])
  results = evaluate.evaluate_files(model, ["msr_vtt_mcq.csv"], str(tmp_path), batch_size=2,
                                    progress=False)
  assert results["msr_vtt_mcq"]["kind"] == "video_mcq"
  assert results["msr_vtt_mcq"]["num_questions"] == 2

  paths = [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]
  feats, ok, _ = evaluate.encode_media(evaluate.Encoders(model), paths, batch_size=2, frames=4)
  want = []
  for path in paths:
    with av.open(path) as container:
      decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    pixels = np.stack([preprocess_frame(decoded[i], model.config.image_size)
                       for i in negbench.frame_indices(len(decoded))])
    want.append(_normalise(np.asarray(model.encode_image(pixels))).mean(0))
  assert ok.all()
  np.testing.assert_allclose(feats, np.stack(want), rtol=1e-4, atol=1e-5)
  text = _normalise(np.asarray(model.encode_text(tokenize(options))))
  chosen = (_normalise(np.stack(want)) @ text.T).argmax(1)
  assert results["msr_vtt_mcq"]["total_accuracy"] == pytest.approx(np.mean(chosen == [2, 1]))
