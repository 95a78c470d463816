"""WebDataset tars (img2dataset layout): brace patterns, index, random access, training input."""
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest

from negjax.data import train_input, webdataset
from test_data_official import Config, jpeg_bytes, take  # pytest puts tests/ on sys.path


def add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_shards(folder, num_shards, per_shard, broken=(), size=40):
  """img2dataset layout: NNNNN.tar with KEY.jpg/.txt/.json; `broken` keys lack a member."""
  os.makedirs(folder, exist_ok=True)
  for s in range(num_shards):
    with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
      for j in range(per_shard):
        i = s * per_shard + j
        key = f"{s:05d}{j:04d}"
        if key + ".jpg" not in broken:
          add(tar, key + ".jpg", jpeg_bytes(i, size))
        if key + ".txt" not in broken:
          add(tar, key + ".txt", f"a photo number {i}".encode())
        add(tar, key + ".json", json.dumps({"key": key, "status": "success"}).encode())
  return os.path.join(folder, "{00000..%05d}.tar" % (num_shards - 1))


def test_expand_braces():
  assert webdataset.expand("d/{00008..00010}.tar") == ["d/00008.tar", "d/00009.tar",
                                                       "d/00010.tar"]
  assert webdataset.expand("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
  assert webdataset.expand("plain.tar") == ["plain.tar"]


def test_index_reads_samples_and_lists_incomplete_ones(tmp_path, monkeypatch):
  monkeypatch.setenv("NEGJAX_CACHE", str(tmp_path / "cache"))
  pattern = write_shards(tmp_path / "wds", 2, 3, broken={"000000001.jpg", "000010002.txt"})
  index = webdataset.index(pattern)
  assert [s.key for s in index.samples] == ["000000000", "000000002", "000010000",
                                            "000010001"]
  assert [k.rsplit(":", 1)[1] for k, _ in index.skipped] == ["000000001", "000010002"]
  assert "no image member" in index.skipped[0][1] and "no .txt" in index.skipped[1][1]
  image, caption, meta = webdataset.read_sample(index.samples[1])
  assert image == jpeg_bytes(2) and caption == "a photo number 2" and meta["key"] == "000000002"
  assert len(os.listdir(tmp_path / "cache" / "wds-index")) == 2  # built once, then cached
  again = webdataset.index(pattern)
  assert again.samples == index.samples and again.skipped == index.skipped
  source = webdataset.Source(index, 24)
  assert source[3]["image"].shape == (24, 24, 3) and source[3]["caption"] == "a photo number 4"


def test_errors_name_the_shard(tmp_path, monkeypatch):
  monkeypatch.setenv("NEGJAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(webdataset.ShardError, match="2 of 2 shards missing"):
    webdataset.index(str(tmp_path / "{0..1}.tar"))
  (tmp_path / "x.tar").write_bytes(b"not a tar at all" * 100)
  with pytest.raises(webdataset.ShardError, match="x.tar: not a readable"):
    webdataset.index([str(tmp_path / "x.tar")])


def test_training_iterator_disjoint_complete_and_resume(tmp_path, monkeypatch):
  monkeypatch.setenv("NEGJAX_CACHE", str(tmp_path / "cache"))
  config = Config(source="webdataset", shards=write_shards(tmp_path / "wds", 2, 4),
                  text_length=12, workers=0)
  key = lambda b: [tuple(c) for c in b["caption_ids"]]
  whole = [key(b) for b in take(train_input.make_iterator(None, config, 4, 3, 16, (0, 1)), 2)]
  parts = [[key(b) for b in take(train_input.make_iterator(None, config, 4, 3, 16, (p, 2)), 2)]
           for p in range(2)]
  epoch = [c for step in whole for c in step]
  assert len(set(epoch)) == 8  # one epoch of 8 samples, each once
  for step in range(2):
    assert sorted(parts[0][step] + parts[1][step]) == sorted(whole[step])
  it = train_input.make_iterator(None, config, 4, 3, 16, (0, 1))
  take(it, 1)
  state = it.get_state()
  expected = take(it, 3)  # crosses into the second epoch
  fresh = train_input.make_iterator(None, config, 4, 3, 16, (0, 1))
  fresh.set_state(state)
  for a, b in zip(expected, take(fresh, 3)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["caption_ids"], b["caption_ids"])


def test_reads_are_safe_across_threads(tmp_path, monkeypatch):
  """Grain's prefetch threads share one source: positional reads, no shared file offset."""
  from concurrent.futures import ThreadPoolExecutor
  monkeypatch.setenv("NEGJAX_CACHE", str(tmp_path / "cache"))
  index = webdataset.index(write_shards(tmp_path / "wds", 1, 6, size=600))  # ~60 kB reads
  source = webdataset.Source(index, 16)
  expected = [webdataset.read_sample(s)[0] for s in index.samples]
  files = source._files
  order = [i % len(index.samples) for i in range(6 * 50)]
  interval = sys.getswitchinterval()
  sys.setswitchinterval(1e-6)  # switch threads often: between a seek and its read
  try:
    with ThreadPoolExecutor(8) as pool:
      got = list(pool.map(lambda i: webdataset.read_sample(index.samples[i], files)[0],
                          order))
  finally:
    sys.setswitchinterval(interval)
  assert got == [expected[i] for i in order]
