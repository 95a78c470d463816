"""negjax.provenance: content hashes that follow the bytes, and the record's fields."""
import hashlib
import os

from negjax import provenance


def test_file_hash_is_sha256_of_the_content(tmp_path):
  path = tmp_path / "weights.bin"
  path.write_bytes(os.urandom(5_000_000))
  assert provenance.sha256(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()
  path.write_bytes(b"other bytes")  # a rewrite (new size and mtime) is rehashed
  assert provenance.sha256(str(path)) == hashlib.sha256(b"other bytes").hexdigest()


def test_folder_hash_follows_names_and_contents(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "x.txt").write_text("one")
  (tmp_path / "y.txt").write_text("two")
  first = provenance.sha256(str(tmp_path))
  assert provenance.sha256(str(tmp_path)) == first
  (tmp_path / "y.txt").write_text("TWO")
  second = provenance.sha256(str(tmp_path))
  assert second != first
  os.rename(tmp_path / "a" / "x.txt", tmp_path / "a" / "z.txt")
  assert provenance.sha256(str(tmp_path)) != second


def test_record_names_version_checkpoint_data_and_date(tmp_path):
  ckpt = tmp_path / "model.safetensors"
  ckpt.write_bytes(b"weights")
  data = tmp_path / "eval.csv"
  data.write_text("filepath,captions\n")
  r = provenance.record(checkpoint=str(ckpt), architecture="negjax-tiny", dtype="float32",
                        data=[provenance.file_record(str(data), rows=0)])
  assert r["negjax_version"] == provenance.version() != ""
  assert r["checkpoint"] == {"path": str(ckpt), "bytes": 7,
                             "sha256": hashlib.sha256(b"weights").hexdigest()}
  assert r["architecture"] == "negjax-tiny" and r["dtype"] == "float32"
  assert r["data"][0]["rows"] == 0 and r["data"][0]["path"] == str(data)
  assert r["date"][:2] == "20" and "T" in r["date"]
