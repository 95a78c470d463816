"""WebDataset shards or the official CSVs -> ArrayRecord shards + TFDS metadata, on Beam.

  python -m negjax.data.convert --config configs/data/convert.py \\
      --config.source=webdataset --config.input='/data/cc12m/{00000..01242}.tar' \\
      --config.out=/data/cc12m-224 --config.runner=DirectRunner --config.workers=16

Every image is decoded once, resized to the training resolution (shorter side to
`image_size`, centre crop) and re-encoded as JPEG, so training decodes small JPEGs instead of
full-size photos. One input chunk becomes one output shard (a tar for webdataset,
`rows_per_shard` rows for a CSV), so the output bytes do not depend on the runner or the
number of workers: `runner="local"` (one process, no Beam) writes the same files as any
Beam runner. Bad records (unreadable image, a row the readers skip) are counted and listed
in OUT/summary.json, never fatal.

Output (the TFDS layout, so `tfds.builder_from_directory(OUT)` reads it too):
  OUT/NAME-captions.array_record-0000k-of-0000n   one record per (image, caption) row
  OUT/NAME-mcq.array_record-...                   one record per MCQ row (official_csv)
  OUT/dataset_info.json, features.json            TFDS metadata
  OUT/summary.json                                counts, skipped records with reasons
Train on it with `--config.data.source=converted --config.data.dir=OUT`.

Record schema: key (str), image (JPEG bytes), caption (str, "" for MCQ rows),
negative_captions (str list: the NegCap generator's column, when present), mcq_options
(4 str, empty for caption rows), mcq_answer (int32, -1 for caption rows).

Runners: the pipeline is plain Beam (Create -> Reshuffle -> Map(convert one chunk)), so the
same command runs on Dataflow, Flink or Spark with `--config.runner=DataflowRunner` (or
FlinkRunner / SparkRunner) and the runner's own flags in `--config.beam_options`, e.g.
`--config.beam_options="--project=P --region=R --temp_location=gs://B/tmp
--requirements_file=req.txt"`. Workers write shards straight to OUT, so OUT must be a
folder every worker can write (NFS, a FUSE-mounted bucket); the driver writes the metadata
once all shards are done.
"""
import dataclasses
import functools
import glob
import io
import json
import os
import shutil
import sys
import time

import numpy as np

from negjax import atomic, cli
from negjax.data import records
from negjax.data.records import FORMAT, shard_path

SPLITS = ("captions", "mcq")
JPEG_OPTIONS = {"quality": 90, "optimize": False, "subsampling": 2}


@functools.cache
def features():
  import tensorflow_datasets as tfds
  text = tfds.features.Text()
  return tfds.features.FeaturesDict({
      "key": text,
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # JPEG bytes
      "caption": text,
      "negative_captions": tfds.features.Sequence(text),
      "mcq_options": tfds.features.Sequence(text),
      "mcq_answer": tfds.features.Tensor(shape=(), dtype=np.int32),
  })


def encode(example):
  """Example dict -> record bytes in this layout (records.encode: deterministic)."""
  return records.encode(example, features)


def decode(record):
  ex = features().deserialize_example_np(record)
  text = lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x)
  return {"key": text(ex["key"]), "image": bytes(ex["image"]), "caption": text(ex["caption"]),
          "negative_captions": tuple(text(s) for s in ex["negative_captions"]),
          "mcq_options": tuple(text(s) for s in ex["mcq_options"]),
          "mcq_answer": int(ex["mcq_answer"])}


def reencode(image_or_path, size):
  """Any image (path, file object) -> JPEG bytes of the (size, size) RGB training image."""
  from PIL import Image
  from negjax.data import annotations
  out = io.BytesIO()
  Image.fromarray(annotations.load_image(image_or_path, size)).save(out, "JPEG", **JPEG_OPTIONS)
  return out.getvalue()


# ------------------------------------------------------------------ chunks
@dataclasses.dataclass(frozen=True)
class Chunk:
  """One unit of work = one output shard."""
  split: str
  shard: int
  num_shards: int
  tar: str = None  # webdataset: the input tar (read by the worker)
  rows: tuple = ()  # official_csv: the rows (official.CaptionRow / MCQRow)


@dataclasses.dataclass
class Result:
  split: str
  shard: int
  length: int = 0
  num_bytes: int = 0
  skipped: list = dataclasses.field(default_factory=list)  # of (key, reason)


def chunks(config):
  """(the work as Chunks, reader skips) for the configured input; read in the driver (CSV
  rows) or left to the workers (tars)."""
  if config.source == "webdataset":
    from negjax.data import webdataset
    tars = webdataset.expand(config.input)
    missing = [t for t in tars if not os.path.isfile(t)]
    if missing:
      raise cli.UserError(f"{len(missing)} of {len(tars)} shards missing, e.g. {missing[0]}")
    return [Chunk("captions", k, len(tars), tar=t) for k, t in enumerate(tars)], []
  if config.source != "official_csv":
    raise cli.UserError(f"source {config.source!r}: use webdataset or official_csv")
  from negjax.data import official
  if not (config.input or config.mcq_input):
    raise cli.UserError("set --config.input (caption CSV) and/or --config.mcq_input (MCQ CSV)")
  out, skipped = [], []
  for split, path in (("captions", config.input), ("mcq", config.mcq_input)):
    if not path:
      continue
    table = (official.read_captions(path, config.image_column, config.caption_column,
                                    config.separator, config.image_root) if split == "captions"
             else official.read_mcq(path, config.image_root))
    skipped += table.skipped
    n = len(table.rows)
    num = max(1, -(-n // config.rows_per_shard))
    out += [Chunk(split, k, num, rows=tuple(table.rows[k * n // num:(k + 1) * n // num]))
            for k in range(num)]
  return out, skipped


def _examples(chunk, size):
  """(key, example or None, skip reason) for every record of a chunk, in input order."""
  if chunk.tar:
    from negjax.data import webdataset
    samples, skipped = webdataset.index_shard(chunk.tar)
    for key, reason in skipped:
      yield key, None, reason
    files = webdataset._Files()
    for s in samples:
      key = f"{os.path.basename(s.shard)}:{s.key}"
      try:
        image, caption, _ = webdataset.read_sample(s, files)
        yield key, _example(key, reencode(io.BytesIO(image), size), caption=caption), None
      except (OSError, ValueError) as e:
        yield key, None, f"cannot read: {e}"
    return
  for row in chunk.rows:
    try:
      image = reencode(row.image_path, size)
    except OSError as e:
      yield row.key, None, f"cannot read image {row.image_path}: {e}"
      continue
    if chunk.split == "captions":
      yield row.key, _example(row.key, image, caption=row.caption,
                              negative_captions=list(row.negative_captions)), None
    else:
      yield row.key, _example(row.key, image, mcq_options=list(row.options),
                              mcq_answer=row.answer), None


def _example(key, image, caption="", negative_captions=(), mcq_options=(), mcq_answer=-1):
  return {"key": key, "image": image, "caption": caption,
          "negative_captions": list(negative_captions), "mcq_options": list(mcq_options),
          "mcq_answer": np.int32(mcq_answer)}


def convert_chunk(chunk, out_dir, name, size):
  """Writes one shard; returns its Result (also what the Beam workers run)."""
  items = ((key, example, reason, ()) for key, example, reason in _examples(chunk, size))
  return records.write_shard_file(
      shard_path(out_dir, name, chunk.split, chunk.shard, chunk.num_shards), items,
      Result(chunk.split, chunk.shard), encode)


# ------------------------------------------------------------------ runners
def run_local(work, out_dir, config):
  """The single-process builder: every chunk in order, no Beam."""
  return [convert_chunk(c, out_dir, config.name, config.image_size) for c in work]


def run_beam(work, out_dir, config):
  """The same chunks through an Apache Beam pipeline. Results come back as JSON files beside
  the shards (they work on any runner whose workers see OUT)."""
  try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
  except ImportError as e:
    raise cli.UserError("the Beam runners need apache-beam: pip install 'negjax[beam]' "
                        "(or --config.runner=local)") from e
  args = config.beam_options.split() if config.beam_options else []
  if config.runner == "DirectRunner":
    args += [f"--direct_num_workers={config.workers or os.cpu_count()}",
             "--direct_running_mode=multi_processing"]
  results_dir = os.path.join(out_dir, ".results")
  os.makedirs(results_dir, exist_ok=True)
  write = functools.partial(_convert_and_record, out_dir=out_dir, name=config.name,
                            size=config.image_size, results_dir=results_dir)
  with beam.Pipeline(runner=config.runner, options=PipelineOptions(args)) as p:
    _ = (p | "chunks" >> beam.Create(work) | "spread" >> beam.Reshuffle()
         | "convert" >> beam.Map(write))
  results = []
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    with open(path) as f:
      d = json.load(f)
    results.append(Result(d["split"], d["shard"], d["length"], d["num_bytes"],
                          [tuple(s) for s in d["skipped"]]))
  shutil.rmtree(results_dir)
  if len(results) != len(work):
    raise cli.UserError(f"Beam returned {len(results)} of {len(work)} shards")
  return results


def _convert_and_record(chunk, out_dir, name, size, results_dir):
  result = convert_chunk(chunk, out_dir, name, size)
  atomic.write_json(os.path.join(results_dir, f"{chunk.split}-{chunk.shard:05d}.json"),
                    dataclasses.asdict(result))
  return chunk.shard


def write_metadata(out_dir, name, results):
  """TFDS dataset_info.json / features.json for the shards of each split."""
  splits = {split: sorted((r for r in results if r.split == split), key=lambda r: r.shard)
            for split in SPLITS}
  records.write_metadata(out_dir, name, {s: part for s, part in splits.items() if part},
                         features, "image-text pairs / MCQs converted by negjax.data.convert")


def build(config):
  """Converts config.input into config.out; returns the summary (also OUT/summary.json).
  Writes into a fresh folder beside OUT and swaps it in only when complete."""
  if not config.out:
    raise cli.UserError("set --config.out=DIR")
  t0 = time.perf_counter()
  work, skipped = chunks(config)
  out = os.path.abspath(config.out)
  partial = f"{out}.partial-{os.getpid()}"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    results = (run_local if config.runner == "local" else run_beam)(work, partial, config)
    for r in results:
      skipped += r.skipped
    made = sum(r.length for r in results)
    if not made:
      raise cli.UserError(f"nothing converted: all {len(skipped)} records skipped, e.g. "
                          f"{skipped[:3]}")
    write_metadata(partial, config.name, results)
    summary = {
        "source": config.source, "input": config.input,
        "mcq_input": config.get("mcq_input", ""), "image_size": config.image_size,
        "runner": config.runner, "workers": config.workers,
        "records": {s: sum(r.length for r in results if r.split == s) for s in SPLITS},
        "shards": {s: sum(1 for r in results if r.split == s) for s in SPLITS},
        "bytes": sum(r.num_bytes for r in results),
        "skipped_count": len(skipped),
        "skipped": [{"key": k, "reason": r} for k, r in skipped],
        "seconds": round(time.perf_counter() - t0, 2)}
    atomic.write_json(os.path.join(partial, "summary.json"), summary)
    _swap_in(partial, out)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return summary


def _swap_in(partial, out):
  old = f"{out}.old-{os.getpid()}"
  if os.path.exists(out):
    if os.listdir(out) and not os.path.exists(os.path.join(out, "summary.json")):
      raise cli.UserError(f"{out} exists and is not a conversion output: choose another "
                          f"--config.out")
    os.rename(out, old)
  os.rename(partial, out)
  shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ training
class Source:
  """Grain random-access source over one split: index -> {"key", "image", "caption"} or
  {"key", "image", "options", "answer"}; images decoded (and resized if the stored size is
  not `size`)."""

  def __init__(self, paths, split, size):
    import grain
    self.paths, self.split, self.size = list(paths), split, size
    self._source = grain.sources.ArrayRecordDataSource(self.paths)
    features()  # import TFDS in the caller's thread (see records.ParsedSource)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    from negjax.data import webdataset
    ex = decode(self._source[index])
    image = webdataset.decode_image(ex["image"], self.size, ex["key"])
    if self.split == "captions":
      return {"key": ex["key"], "image": image, "caption": ex["caption"]}
    return {"key": ex["key"], "image": image, "options": ex["mcq_options"],
            "answer": ex["mcq_answer"]}


def training_source(directory, split, size):
  """The split's shards under `directory` as a `Source`, or None if it has none."""
  if not directory or not os.path.isdir(directory):
    raise cli.UserError(f"data.dir: no conversion output at {directory}")
  paths = sorted(glob.glob(os.path.join(glob.escape(directory), f"*-{split}.{FORMAT}-*")))
  return Source(paths, split, size) if paths else None


def print_summary(summary, file=sys.stdout):
  print(f"records: {summary['records']} in {summary['shards']} shards, "
        f"{summary['bytes'] / 1e6:.1f} MB, {summary['seconds']} s ({summary['runner']})",
        file=file)
  print(f"skipped: {summary['skipped_count']}", file=file)
  for s in summary["skipped"][:20]:
    print(f"  {s['key']}: {s['reason']}", file=file)
  if summary["skipped_count"] > 20:
    print("  ... (all listed in summary.json)", file=file)


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}: settings are --config.KEY=VALUE")
  print_summary(build(_CONFIG.value))


def run_cli():
  global _CONFIG
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "conversion config file")
  cli.run(main)


if __name__ == "__main__":
  # Through the package, not __main__: Beam workers unpickle Chunk by its module's name.
  from negjax.data import convert
  convert.run_cli()
