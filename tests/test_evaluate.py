"""End to end: a tiny CLIP on a few images, library call and CLI, checked against NumPy."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from negjax import evaluate, metrics
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
  results = evaluate.evaluate_files(model, None, str(root), batch_size=3, progress=False)
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
  assert got["num_skipped_images"] == 1
  assert got["skipped_images"][0]["path"].endswith("missing.png")

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
  assert got["num_skipped_images"] == 1


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


def test_cli_writes_results(bench, tmp_path):
  root, model = bench
  from negjax.models.checkpoints import save_open_clip
  ckpt = str(tmp_path / "tiny.safetensors")
  save_open_clip(model, ckpt)
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "negjax.evaluate", "--config",
         os.path.join(os.path.dirname(__file__), "..", "configs", "negbench.py"),
         f"--config.checkpoint={ckpt}", f"--config.data_root={root}",
         "--config.files=shapes_val_mcq.csv,shapes_val_negated_retrieval.csv",
         f"--config.workdir={out}", "--config.batch_size=4"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=None)
  results = json.loads((out / "results.json").read_text())
  want = evaluate.evaluate_files(model, None, str(root), batch_size=3, progress=False)
  assert results["shapes_val_mcq"]["total_accuracy"] == pytest.approx(
      want["shapes_val_mcq"]["total_accuracy"])
  rows = dict(list(csv.reader(open(out / "results.csv")))[1:])
  assert float(rows["shapes-negated-image_retrieval_recall@1"]) == pytest.approx(
      want["shapes_val_negated_retrieval"]["image_retrieval_recall@1"], abs=1e-6)
  assert (out / "mcq_accuracy.png").stat().st_size > 0


def test_malformed_file_stops_with_its_name(bench, tmp_path):
  root, model = bench
  bad = tmp_path / "bad_retrieval.csv"
  bad.write_text('filepath,captions\nimages/0.png,"[\'ok\']"\nimages/1.png,"open(\'x\')"\n')
  with pytest.raises(ValueError, match=r"bad_retrieval\.csv:3"):
    evaluate.evaluate_files(model, [str(bad)], str(root), progress=False)


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


def test_video_mcq_embeds_mean_of_four_frames(bench, tmp_path):
  pytest.importorskip("av")
  from negjax.data import negbench
  _, model = bench
  _write_video(tmp_path / "a.mp4", [10 * i for i in range(12)])
  _write_video(tmp_path / "b.mp4", [200 - 10 * i for i in range(12)])
  with open(tmp_path / "msr_vtt_mcq.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image_path"] + [f"caption_{i}" for i in range(4)]
               + ["correct_answer", "correct_answer_template"])
    w.writerow(["a.mp4", "red dog", "blue cat", "no dog", "green", 2, "negative"])
    w.writerow(["b.mp4", "red dog", "blue cat", "no dog", "green", 1, "positive"])
  results = evaluate.evaluate_files(model, ["msr_vtt_mcq.csv"], str(tmp_path), batch_size=2,
                                    progress=False)
  assert results["msr_vtt_mcq"]["kind"] == "video_mcq"
  assert results["msr_vtt_mcq"]["num_questions"] == 2

  enc = evaluate.Encoders(model)
  path = str(tmp_path / "a.mp4")
  feats, ok, _ = evaluate.encode_media(enc, [path], batch_size=2, frames=4)
  frames = np.stack([preprocess(f, model.config.image_size) for f in negbench.video_frames(path)])
  want = np.asarray(model.encode_image(frames)).mean(0)
  assert ok.all()
  np.testing.assert_allclose(feats[0], want, rtol=1e-4, atol=1e-5)
