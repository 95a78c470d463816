"""Training shards: one ArrayRecord record per image, described as a TFDS dataset.

Record schema (a TFDS `FeaturesDict`, serialized as a `tf.train.Example` proto):

  key            str                  image id in its source
  image          uint8 [H, W, 3]      pre-resized; stored raw, zlib-compressed
  affirmative    str [num_affirmative] captions naming every present object
  negcap         str [3]              NegCap captions: present objects + one absent negated
  negcap_negated str [3]              the object each NegCap caption negates
  mcq_options    str [4]              NegMCQ options, answer position shuffled
  mcq_types      str [4]              "positive" / "negative" / "hybrid" per option
  mcq_answer     int32                index of the true option
  present        str [*]              objects in the image
  absent         str [*]              objects known (or sampled) to be absent

`training_source` / `decode` return these as numpy arrays (str arrays of fixed length per
data set), except `key` (str) and `present` / `absent`, which come back as one
";"-joined str each so that every field of a Grain batch stacks.

TFDS serializes these features with pure Python protobuf (no TensorFlow needed, unlike
`tfds.features.Image`, which is why the image is a zlib tensor rather than a PNG feature).
Shards are fixed index ranges, so the bytes do not depend on how many processes write them.
Files are named like TFDS's own (`NAME-SPLIT.array_record-0000k-of-0000n`) and
`write_metadata` adds `dataset_info.json`/`features.json`, so
`tfds.builder_from_directory(dir).as_data_source()` reads them too.
"""
import collections
import dataclasses
import functools
import glob
import multiprocessing
import os

import numpy as np

FORMAT = "array_record"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access for Grain
STRING_LISTS = ("affirmative", "negcap", "negcap_negated", "mcq_options", "mcq_types",
                "present", "absent")
JOINED = ("present", "absent")


@functools.cache
def features():
  import tensorflow_datasets as tfds  # slow import, so only when records are touched
  text_list = tfds.features.Sequence(tfds.features.Text())
  return tfds.features.FeaturesDict({
      "key": tfds.features.Text(),
      "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
      **{name: text_list for name in STRING_LISTS},
      "mcq_answer": tfds.features.Tensor(shape=(), dtype=np.int32),
  })


@functools.cache
def _serializer(features_of):
  from tensorflow_datasets.core import example_serializer
  return example_serializer.ExampleSerializer(features_of().get_serialized_info())


def encode(example, features_of=features):
  """Example dict -> record bytes, identical in every process. `features_of`: the function
  giving the record layout (this module's `features` unless another layout is written).

  `FeaturesDict.serialize_example` writes the proto's feature map in hash order, which
  changes with each interpreter's string-hash seed; deterministic serialization sorts it.
  """
  proto = _serializer(features_of).get_tf_example(features_of().encode_example(example))
  return proto.SerializeToString(deterministic=True)


def decode(record):
  """Record bytes -> the example dict described in the module docstring."""
  ex = features().deserialize_example_np(record)
  return _to_python(ex)


def _text(x):
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _to_python(ex):
  out = {"key": _text(ex["key"]), "image": np.asarray(ex["image"], np.uint8),
         "mcq_answer": np.int32(ex["mcq_answer"])}
  for name in STRING_LISTS:
    texts = [_text(s) for s in ex[name]]
    # Variable-length object lists become one ";"-joined str, so any batch stacks.
    out[name] = ";".join(texts) if name in JOINED else np.array(texts, dtype=str)
  return out


def shard_path(out_dir, name, split, shard, num_shards):
  return os.path.join(out_dir, f"{name}-{split}.{FORMAT}-{shard:05d}-of-{num_shards:05d}")


class Skip(Exception):
  """Raised by an example function for an input that cannot become a record."""


@dataclasses.dataclass
class ShardResult:
  shard: int
  length: int
  num_bytes: int
  tags: collections.Counter
  skipped: list  # of (key, reason)


def write_shard_file(path, items, result, encode_fn=None):
  """Writes one ArrayRecord shard from `items`, (key, example or None, skip reason, tags)
  tuples, counting into `result`: .length, .num_bytes, .skipped [(key, reason)] and, where
  `result` has one, the .tags Counter. One loop for every writer of records (this module's
  builder and negjax.data.convert); `encode_fn` None: this module's `encode`."""
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(path, WRITER_OPTIONS)
  for key, example, reason, tags in items:
    if example is None:
      result.skipped.append((key, reason))
      continue
    record = (encode_fn or encode)(example)
    writer.write(record)
    result.length += 1
    result.num_bytes += len(record)
    if tags:
      result.tags.update(tags)
  writer.close()
  return result


def _write_shard(make_example, out_dir, name, split, num_items, num_shards, shard):
  lo, hi = shard * num_items // num_shards, (shard + 1) * num_items // num_shards

  def items():
    for index in range(lo, hi):
      try:
        example, tags = make_example(index)
      except Skip as e:
        key, reason = e.args
        yield key, None, reason, ()
        continue
      yield None, example, None, tags

  return write_shard_file(shard_path(out_dir, name, split, shard, num_shards), items(),
                          ShardResult(shard, 0, 0, collections.Counter(), []))


def write_split(make_example, num_items, out_dir, name, split, num_shards, workers=1,
                progress=True):
  """Writes items [0, num_items) as `num_shards` shards with `workers` processes.

  `make_example(index) -> (example dict, list of tag strings)` must be picklable for
  workers > 1; it raises `Skip(key, reason)` for items to leave out. Returns the per-shard
  results in shard order.
  """
  os.makedirs(out_dir, exist_ok=True)
  for stale in glob.glob(os.path.join(out_dir, f"{name}-{split}.{FORMAT}-*")):
    os.remove(stale)  # a previous build with another shard count would mix in
  num_shards = max(1, min(num_shards, num_items))
  task = functools.partial(_write_shard, make_example, out_dir, name, split, num_items,
                           num_shards)
  bar = _progress(num_shards, f"{split} shards", progress)
  if workers <= 1:
    results = []
    for k in range(num_shards):
      results.append(task(k))
      bar.update()
  else:
    # spawn: a clean interpreter per worker, safe beside libraries that started threads.
    with multiprocessing.get_context("spawn").Pool(min(workers, num_shards)) as pool:
      results = []
      for r in pool.imap_unordered(task, range(num_shards)):
        results.append(r)
        bar.update()
  bar.close()
  return sorted(results, key=lambda r: r.shard)


def _progress(total, desc, enabled):
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, disable=not enabled, unit="shard")


def write_metadata(out_dir, name, splits, features_of=features,
                   description="negjax NegCap/NegMCQ training records"):
  """Makes `out_dir` a TFDS dataset directory; splits: {split: [results with .length and
  .num_bytes, in shard order]}; `features_of` as for `encode`."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import naming
  template = naming.ShardedFileTemplate(
      data_dir=out_dir, dataset_name=name, filetype_suffix=FORMAT,
      template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
  infos = [tfds.core.SplitInfo(name=split, shard_lengths=[r.length for r in results],
                               num_bytes=sum(r.num_bytes for r in results),
                               filename_template=template.replace(split=split))
           for split, results in splits.items()]
  tfds.folder_dataset.write_metadata(
      data_dir=out_dir, features=features_of(), split_infos=infos, filename_template=template,
      check_data=False, description=description)


class ParsedSource:
  """A Grain random-access source yielding decoded example dicts."""

  def __init__(self, paths):
    import grain
    self.paths = list(paths)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)
    # Import tensorflow_datasets here, in the caller's thread. Left to the first read it
    # would run in a Grain prefetch thread, and its import swaps `builtins.__import__`
    # process-wide (etils lazy imports) while, e.g., Orbax restore threads are importing:
    # they then get a lazy stub instead of `math.log` and the restore fails.
    features()

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return decode(self._source[index])

  def __repr__(self):
    return f"ParsedSource({len(self.paths)} shards, {len(self)} records)"


def training_source(path_or_dir, split="train"):
  """Records of a split as a Grain `RandomAccessDataSource` of dicts (see module docstring).

  `path_or_dir`: a directory of shards (e.g. `DIR/train` of `negjax.data.make`), a single
  shard, or a glob. Shards are read in name order, so indices are stable.
  """
  path = os.fspath(path_or_dir)
  if os.path.isdir(path):
    paths = sorted(glob.glob(os.path.join(path, f"*-{split}.{FORMAT}-*")))
  else:
    paths = sorted(glob.glob(path))
  if not paths:
    raise FileNotFoundError(f"no {split!r} {FORMAT} shards at {path}")
  counts = {p.rsplit("-of-", 1)[-1] for p in paths}
  if len(counts) > 1:
    raise ValueError(f"{path}: shards of several builds mixed (-of-{sorted(counts)})")
  return ParsedSource(paths)
