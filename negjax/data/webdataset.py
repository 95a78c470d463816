"""WebDataset tar shards as img2dataset writes them, read with random access through Grain.

Layout: `DIR/00000.tar`, `DIR/00001.tar`, ... each holding, per sample, members sharing a
key: `KEY.jpg` (or .jpeg/.png/.webp), `KEY.txt` (the caption) and usually `KEY.json`
(metadata; read, never needed). Shards are named with a brace pattern such as
`DIR/{00000..00009}.tar` (ranges and comma lists, as WebDataset and img2dataset write them).

Grain needs random access, a tar offers only a stream: `index` walks each tar once (headers
only, no image decoding) and records every member's byte offset and size, cached as JSON
under ~/.cache/negjax/wds-index (keyed by the shard's path, size and modification time),
so later runs and every worker process just `seek` + `read`. Samples without an image or a
caption member are skipped, counted and listed; a shard that is not a tar is an error
naming it.
"""
import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile

from negjax import atomic, cli

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ShardError(cli.UserError):
  pass


def expand(pattern):
  """'D/{00000..00002}.tar' -> ['D/00000.tar', 'D/00001.tar', 'D/00002.tar']; '{a,b}' lists;
  several braces expand as a product; zero padding follows the range's first bound."""
  match = re.search(r"\{([^{}]*)\}", pattern)
  if not match:
    return [pattern]
  body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
  numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if numeric:
    lo, hi = numeric.groups()
    if int(hi) < int(lo):
      raise ShardError(f"shard pattern {pattern!r}: range {body} runs backwards")
    parts = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
  else:
    parts = body.split(",")
  return [p for part in parts for p in expand(head + part + tail)]


@dataclasses.dataclass(frozen=True)
class Sample:
  shard: str
  key: str
  image: tuple  # (offset, size) of the image member
  text: tuple  # (offset, size) of the caption member
  meta: tuple = None  # (offset, size) of the .json member, if any


def _split_name(name):
  """'dir/000012345.jpg' -> ('dir/000012345', 'jpg'): key up to the basename's first dot."""
  directory, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(directory, stem), ext.lower()


def _cache_path(shard):
  st = os.stat(shard)
  ident = f"{os.path.abspath(shard)}|{st.st_size}|{st.st_mtime_ns}|v1"
  cache = os.path.expanduser(os.environ.get("NEGJAX_CACHE", "~/.cache/negjax"))
  return os.path.join(cache, "wds-index", hashlib.sha1(ident.encode()).hexdigest()[:20] + ".json")


def index_shard(shard):
  """(samples, skipped) of one tar, from the cache or by walking its headers once."""
  try:
    cached = _cache_path(shard)
  except OSError as e:
    raise ShardError(f"{shard}: cannot open: {e}") from e
  if os.path.exists(cached):
    with open(cached) as f:
      data = json.load(f)
  else:
    data = _walk(shard)
    try:
      os.makedirs(os.path.dirname(cached), exist_ok=True)
      atomic.write_json(cached, data)
    except OSError:
      pass  # a read-only cache costs a re-walk next time, nothing else
  samples = [Sample(shard, k, tuple(i), tuple(t), tuple(m) if m else None)
             for k, i, t, m in data["samples"]]
  return samples, [tuple(s) for s in data["skipped"]]


def _walk(shard):
  members = {}
  try:
    with tarfile.open(shard, "r:") as tar:  # uncompressed only: offsets must be real
      for m in tar:
        if m.isfile():
          key, ext = _split_name(m.name)
          members.setdefault(key, {})[ext] = (m.offset_data, m.size)
  except (tarfile.TarError, OSError) as e:
    raise ShardError(f"{shard}: not a readable uncompressed tar: {e}") from e
  samples, skipped = [], []
  for key, parts in members.items():  # tar order
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    where = f"{shard}:{key}"
    if image is None:
      skipped.append((where, f"no image member (has {sorted(parts)})"))
    elif "txt" not in parts:
      skipped.append((where, f"no .txt caption (has {sorted(parts)})"))
    else:
      samples.append((key, image, parts["txt"], parts.get("json")))
  return {"samples": samples, "skipped": skipped}


@dataclasses.dataclass
class Index:
  shards: list
  samples: list
  skipped: list


def index(pattern_or_paths):
  """Every sample of the shards (a brace pattern or a list of paths), in shard order."""
  paths = expand(pattern_or_paths) if isinstance(pattern_or_paths, str) else list(
      pattern_or_paths)
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise ShardError(f"{len(missing)} of {len(paths)} shards missing, e.g. {missing[0]}")
  samples, skipped = [], []
  for path in paths:
    s, k = index_shard(path)
    samples += s
    skipped += k
  if not samples:
    raise ShardError(f"no usable samples in {len(paths)} shards ({len(skipped)} skipped)")
  return Index(paths, samples, skipped)


class _Files:
  """Open shard files, one descriptor per shard per process (forked workers reopen
  theirs). Reads are positional (`os.pread`): Grain's prefetch threads share them safely."""

  def __init__(self):
    self.pid, self.fds = os.getpid(), {}

  def read(self, path, span):
    if self.pid != os.getpid():
      self.pid, self.fds = os.getpid(), {}
    fd = self.fds.get(path)
    if fd is None:
      fd = self.fds.setdefault(path, os.open(path, os.O_RDONLY))
    data = os.pread(fd, span[1], span[0])
    if len(data) != span[1]:
      raise OSError(f"{path}: shard shorter than its index (changed since indexed?)")
    return data

  def __getstate__(self):
    return {}

  def __setstate__(self, state):
    self.__init__()


def read_sample(sample, files=None):
  """(image bytes, caption str, metadata dict) of one sample."""
  files = files or _Files()
  image = files.read(sample.shard, sample.image)
  caption = files.read(sample.shard, sample.text).decode("utf-8", "replace").strip()
  meta = json.loads(files.read(sample.shard, sample.meta)) if sample.meta else {}
  return image, caption, meta


def decode_image(data, size, where):
  """JPEG/PNG bytes -> uint8 (size, size, 3) at the training resolution."""
  from negjax.data import annotations
  try:
    return annotations.load_image(io.BytesIO(data), size)
  except OSError as e:
    raise OSError(f"{where}: cannot decode image: {e}") from e


class Source:
  """Grain random-access source: index -> {"key", "image", "caption"}."""

  def __init__(self, shard_index, size):
    self.samples, self.size, self._files = shard_index.samples, size, _Files()

  def __len__(self):
    return len(self.samples)

  def __getitem__(self, i):
    sample = self.samples[i]
    image, caption, _ = read_sample(sample, self._files)
    where = f"{sample.shard}:{sample.key}"
    return {"key": where, "image": decode_image(image, self.size, where), "caption": caption}
