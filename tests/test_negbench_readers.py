"""NegBench CSV readers, the Grain evaluation input, and their errors on bad input."""
import csv
import importlib
import os

import numpy as np
import pytest
from PIL import Image

from negjax import metrics
from negjax.data import eval_input, negbench


def _write(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


MCQ_HEADER = (["image_path"] + [f"caption_{i}" for i in range(4)]
              + ["correct_answer", "correct_answer_template"])


def test_reads_official_kinds_and_resolves_paths(tmp_path):
  root = tmp_path / "root"
  mcq = _write(tmp_path / "COCO_val_mcq.csv", MCQ_HEADER,
               [["a.jpg", "w", "x", "y", "z", 2, "negative"],
                ["/abs/b.jpg", "w", "x", "y", "z", 0, "hybrid"]])
  ds = negbench.read(mcq, str(root))
  assert ds.kind == "mcq" and ds.paths == [str(root / "a.jpg"), "/abs/b.jpg"]
  np.testing.assert_array_equal(ds.answer, [2, 0])
  np.testing.assert_array_equal(ds.question_type, [1, 2])
  assert (ds.option_types == metrics.UNKNOWN).all()  # official files carry no types

  binary = _write(tmp_path / "chexpert_binary_mcq.csv",
                  ["image_path", "caption_0", "caption_1", "correct_answer"],
                  [["c.jpg", "p", "q", 1]])
  assert negbench.read(binary).kind == "binary_mcq"
  assert negbench.read(binary).paths == [str(tmp_path / "c.jpg")]  # default root: CSV folder

  video = _write(tmp_path / "msr_vtt_mcq.csv", MCQ_HEADER,
                 [["v.mp4", "a", "b", "c", "d", 3, "positive"]])
  assert negbench.read(video).kind == "video_mcq"

  ret = _write(tmp_path / "COCO_val_retrieval.csv", ["filepath", "captions"],
               [["a.jpg", repr(["one", "two, with comma"])], ["b.jpg", "['three']"]])
  ds = negbench.read(ret)
  assert ds.kind == "retrieval" and ds.captions == [["one", "two, with comma"], ["three"]]
  vret = _write(tmp_path / "msr_vtt_retrieval.csv", ["video_path", "captions"],
                [["v.avi", "['x']"]])
  assert negbench.read(vret).kind == "video_retrieval"

  _write(tmp_path / "notes.csv", ["a", "b"], [[1, 2]])
  found = negbench.find_files(str(tmp_path))
  assert [os.path.basename(f) for f in found] == sorted(
      ["COCO_val_mcq.csv", "chexpert_binary_mcq.csv", "msr_vtt_mcq.csv",
       "COCO_val_retrieval.csv", "msr_vtt_retrieval.csv"])


def test_option_type_columns(tmp_path):
  header = MCQ_HEADER + [f"caption_{i}_type" for i in range(4)]
  f = _write(tmp_path / "s.csv", header,
             [["a.png", "a", "b", "c", "d", 1, "negative", "positive", "negative", "hybrid",
               "negative"]])
  np.testing.assert_array_equal(negbench.read(f).option_types, [[0, 1, 2, 1]])


@pytest.mark.parametrize("row, message", [
    (["a.jpg", "w", "x", "y", "z", 4, "negative"], r"out of range"),
    (["a.jpg", "w", "x", "y", "z", "one", "negative"], r"not an integer"),
    (["a.jpg", "w", "x", "y", "z", 0, "affirmation"], r"unknown template"),
    (["a.jpg", "w", "x", "y", 0, "negative"], r"6 columns, header has 7"),
])
def test_malformed_mcq_rows_name_file_and_line(tmp_path, row, message):
  good = ["b.jpg", "w", "x", "y", "z", 0, "positive"]
  f = _write(tmp_path / "bad.csv", MCQ_HEADER, [good, row])
  with pytest.raises(negbench.NegBenchFormatError, match=r"bad\.csv:3: .*" + message):
    negbench.read(f)


@pytest.mark.parametrize("cell", ["__import__('os').system('echo hi')", "['a', 1]", "[]",
                                  "'just a string'", "['unclosed'"])
def test_captions_are_parsed_as_literals_only(tmp_path, cell):
  f = _write(tmp_path / "r.csv", ["filepath", "captions"], [["a.jpg", cell]])
  with pytest.raises(negbench.NegBenchFormatError, match=r"r\.csv:2: "):
    negbench.read(f)


@pytest.mark.parametrize("header, message", [
    # 4 options and no template: not a binary MCQ (that is exactly caption_0, caption_1)
    (MCQ_HEADER[:-1], r"4 options .* no correct_answer_template"),
    (["image_path", "caption_0", "caption_1", "caption_2", "correct_answer"],
     r"3 options .* no correct_answer_template"),
    (["image_path", "caption_0", "caption_1"], r"needs column\(s\) correct_answer"),
    (["caption_0", "caption_1", "correct_answer"], r"needs column\(s\) image_path"),
    (["image_path", "caption_0", "caption_1", "caption_3", "correct_answer",
      "correct_answer_template"], r"has caption_3 but no caption_2"),
    (["image", "captions"], r"needs a media path column"),
])
def test_incomplete_headers_name_the_missing_column(tmp_path, header, message):
  f = _write(tmp_path / "x.csv", header, [["a"] * len(header)])
  with pytest.raises(negbench.NegBenchFormatError, match=r"x\.csv: .*" + message):
    negbench.read(f)
  with pytest.raises(negbench.NegBenchFormatError, match=message):  # not silently left out
    negbench.find_files(str(tmp_path))


def test_partial_option_type_columns_are_an_error(tmp_path):
  f = _write(tmp_path / "s.csv", MCQ_HEADER + ["caption_0_type", "caption_1_type"],
             [["a.png", "a", "b", "c", "d", 1, "negative", "positive", "negative"]])
  with pytest.raises(negbench.NegBenchFormatError, match="caption_2_type, caption_3_type"):
    negbench.read(f)


def test_utf8_bom_is_read_and_other_encodings_are_refused(tmp_path):
  text = "image_path,caption_0,caption_1,correct_answer\nc.jpg,un caf\u00e9,no caf\u00e9,1\n"
  (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
  ds = negbench.read(str(tmp_path / "bom.csv"))
  assert ds.kind == "binary_mcq" and ds.options == [["un caf\u00e9", "no caf\u00e9"]]
  assert negbench.find_files(str(tmp_path)) == [str(tmp_path / "bom.csv")]
  (tmp_path / "latin1.csv").write_bytes(text.encode("latin-1"))
  with pytest.raises(negbench.NegBenchFormatError,
                     match=r"latin1\.csv:2: not UTF-8 text \(byte 0xe9"):
    negbench.read(str(tmp_path / "latin1.csv"))


def test_empty_files_are_errors(tmp_path):
  (tmp_path / "empty.csv").write_text("")
  with pytest.raises(negbench.NegBenchFormatError, match="empty"):
    negbench.read(str(tmp_path / "empty.csv"))
  f = _write(tmp_path / "header_only.csv", MCQ_HEADER, [])
  with pytest.raises(negbench.NegBenchFormatError, match="no rows"):
    negbench.read(f)


def test_video_frames_are_sampled_uniformly(tmp_path):
  av = pytest.importorskip("av")
  path = str(tmp_path / "clip.mp4")
  with av.open(path, "w") as out:
    stream = out.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    for i in range(10):  # frame i is a flat grey of level 20 * i
      img = np.full((32, 32, 3), 20 * i, np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  frames = negbench.video_frames(path)
  assert len(frames) == 4
  levels = [int(np.median(f)) for f in frames]  # the official frames 1, 3, 5, 8
  np.testing.assert_allclose(levels, [20, 60, 100, 160], atol=6)


def test_media_batches_pad_and_shard(tmp_path, monkeypatch):
  paths = []
  for i in range(5):
    p = tmp_path / f"{i}.png"
    Image.fromarray(np.full((8, 12, 3), 40 * i, np.uint8)).save(p)
    paths.append(str(p))
  paths[3] = str(tmp_path / "missing.png")
  (tmp_path / "broken.png").write_bytes(b"not a png")
  paths.append(str(tmp_path / "broken.png"))
  seen = []
  for process in range(2):  # the same code on two hosts
    monkeypatch.setattr("jax.process_count", lambda: 2)
    monkeypatch.setattr("jax.process_index", lambda p=process: p)
    batches, steps = eval_input.media_batches(paths, image_size=4, batch_size=2)
    batches = list(batches)
    assert len(batches) == steps == 2
    for b in batches:
      assert b["image"].shape == (2, 1, 4, 4, 3)  # static shape, padding included
      for index, status, error in zip(b["index"], b["status"], b["error"]):
        if status == eval_input.PADDING:
          assert index == -1
          continue
        seen.append(int(index))
        if index == 3:
          assert status == eval_input.UNREADABLE and "not found" in error
        elif index == 5:
          assert status == eval_input.UNREADABLE and "broken.png" in error
        else:
          assert status == eval_input.OK
  assert sorted(seen) == list(range(6))  # each item exactly once across hosts


def test_decompression_bomb_is_flagged(tmp_path, monkeypatch):
  p = tmp_path / "big.png"
  Image.new("L", (64, 64)).save(p)
  module = importlib.import_module("negjax.image")
  monkeypatch.setattr(module, "MAX_PIXELS", 1000)
  out = eval_input.LoadMedia([str(p)], 4, 1).map(0)
  assert out["status"] == eval_input.BOMB and "decompression bomb" in out["error"]
