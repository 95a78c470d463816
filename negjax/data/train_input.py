"""Training input: Grain over the data engine's ArrayRecord shards.

shuffle (a new order each epoch) -> repeat -> this process's slice -> per-example caption
choice and tokenization (seeded by index, so a restored iterator replays exactly) ->
batch -> optional worker processes. The iterator's state goes into every checkpoint.
`trim_text` then cuts each batch's text padding before it goes to the devices (CLIP's
tokenizer only: a SigLIP text tower reads its padding, see `Tokenizer`).
"""
import dataclasses
import glob
import logging
import os

import grain
import jax
import numpy as np
from PIL import Image

from negjax import sharding
from negjax.data import captions, records
from negjax.tokenizer import tokenize, used_length

CACHE_DIR = os.path.expanduser(os.environ.get("NEGJAX_CACHE", "~/.cache/negjax"))
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Texts -> int32 ids [N, length]: CLIP's BPE (`file` None), or the SigLIP tokenizer file
  of a checkpoint (spiece.model / tokenizer.json, `siglip.get_tokenizer`). Two plain fields,
  so it pickles into Grain's worker processes, which build the tokenizer once each."""
  length: int
  file: str | None = None

  @property
  def trims(self) -> bool:
    """Whether `trim_text` may cut the padding: CLIP's text tower never reads past EOT; a
    SigLIP tower pools the last position, so its ids keep the model's full length."""
    return self.file is None

  def __call__(self, texts):
    if self.file is None:
      return tokenize(texts, self.length)
    from negjax.models import siglip
    return siglip.get_tokenizer(self.file, self.length)(texts)


def tokenizer_for(model, text_length: int) -> Tokenizer:
  """The training input's tokenizer for `model`: CLIP's BPE at `text_length` (data.
  text_length), or the model's own (models with a `tokenize`, SigLIP) at its context
  length: data.text_length is then not used, and a warning says so when it differs."""
  if not hasattr(model, "tokenize"):
    return Tokenizer(text_length)
  file, length = model.config.tokenizer_file, model.config.context_length
  if file is None:
    raise ValueError(f"{type(model).__name__} has no tokenizer file: load it from a folder "
                     "with its spiece.model or tokenizer.json")
  if text_length != length:
    log.warning("data.text_length=%d is not used: %s texts are tokenized with %s to the "
                "model's context length %d (its text tower reads the padding)", text_length,
                type(model).__name__, os.path.basename(file), length)
  return Tokenizer(length, file)


def _as_tokenizer(text) -> Tokenizer:
  """A `Tokenizer`, or an int: CLIP's BPE at that length."""
  return text if isinstance(text, Tokenizer) else Tokenizer(int(text))


@dataclasses.dataclass(frozen=True)
class TrainingData:
  train_dir: str  # ArrayRecord shards (None: data.source is not "records")
  eval_root: str  # NegBench-format CSVs (and their images)
  eval_files: tuple  # the CSVs under eval_root


def prepare(data_config, seed: int) -> TrainingData:
  """The configured data folder, or the shapes world (`data_config.shapes`, a data-engine
  config) built once into the cache, in a folder named by everything that shapes its
  content (`make.fingerprint`: the settings and the engine version), so that a changed
  caption engine never serves an old world."""
  directory = data_config.dir
  if data_config.get("source", "records") != "records":  # its own files; eval from eval.*
    return TrainingData(None, None, ())
  if directory is None:
    from negjax.data import make
    shapes = data_config.shapes
    directory = os.path.join(CACHE_DIR, f"shapes-{shapes.train_size}-{shapes.eval_size}"
                             f"-{shapes.image_size}px-seed{shapes.seed}"
                             f"-{make.fingerprint(shapes)}")
    if not os.path.exists(os.path.join(directory, "summary.json")):
      print(f"building the shapes world into {directory} (once)")
      shapes = shapes.copy_and_resolve_references()
      shapes.out = directory
      make.print_summary(make.build(shapes))
  eval_root = os.path.join(directory, "eval")
  return TrainingData(os.path.join(directory, "train"), eval_root,
                      tuple(sorted(glob.glob(os.path.join(eval_root, "*.csv")))))


class TrainingExample(grain.transforms.RandomMap):
  """One record -> image, one caption drawn from the configured pools, tokenized MCQ.

  With `fresh_mcq`, the MCQ is drawn anew from the record's present and absent objects at
  every visit (the data engine's own `captions.mcq`, true-option types weighted by
  `mcq_answer_weights`) instead of the stored one: more distinct questions per image.
  With `retain_pool` (e.g. "affirmative"), also `retain_ids`: one caption of that pool,
  drawn last (the other draws are those of a run without it), for distillation
  (negjax.retention.distill_terms). `text`: a `Tokenizer`, or a length for CLIP's."""

  def __init__(self, pools, text, image_size, fresh_mcq=False, mcq_answer_weights=None,
               retain_pool=None):
    self.pools = tuple(pools)
    self.retain_pool = retain_pool
    self.tokenize = _as_tokenizer(text)
    self.image_size = image_size
    self.fresh_mcq = fresh_mcq
    self.mcq_answer_weights = mcq_answer_weights

  def random_map(self, example, rng: np.random.Generator):
    pooled = [c for pool in self.pools for c in example[pool]]
    caption = pooled[rng.integers(len(pooled))]
    image = example["image"]
    if image.shape[:2] != (self.image_size, self.image_size):
      image = np.asarray(Image.fromarray(image).resize(
          (self.image_size, self.image_size), Image.BICUBIC))
    if self.fresh_mcq:
      present, absent = (example[k].split(";") for k in ("present", "absent"))
      drawn, answer = captions.mcq(present, absent, rng, answer_weights=self.mcq_answer_weights)
      options = [o.text for o in drawn]
    else:
      options, answer = list(example["mcq_options"]), example["mcq_answer"]
    out = {
        "image": image,
        "caption_ids": self.tokenize([caption])[0],
        "mcq_ids": self.tokenize(options),
        "mcq_answer": np.int32(answer),
    }
    if self.retain_pool:
      retained = example[self.retain_pool]
      out["retain_ids"] = self.tokenize([retained[rng.integers(len(retained))]])[0]
    return out


SOURCES = ("records", "official_csv", "webdataset", "converted")


def make_iterator(train_dir, data_config, global_batch_size, seed, image_size, process=None,
                  retain_pool=None, tokenizer=None):
  """A checkpointable iterator of this process's share of each global batch.

  `data_config.source` (default "records") picks the input: negjax records at `train_dir`
  (one row per image: image, caption, MCQ, and with `retain_pool` a caption of that pool
  as `retain_ids`), or a caption stream and/or an MCQ stream of other images
  (`official_csv`, `webdataset`, `converted`; see `streams`). `process`: (index, count),
  default JAX's. `tokenizer`: a `Tokenizer` (`tokenizer_for` the model), default CLIP's at
  data.text_length."""
  index, count = process or (jax.process_index(), jax.process_count())
  source = data_config.get("source", "records")
  if retain_pool and source != "records":
    raise ValueError(f"retention captions (retain_pool={retain_pool!r}) need data.source="
                     f"records, got {source!r}")
  tokenizer = tokenizer or Tokenizer(data_config.text_length)
  if source == "records":
    ds = _records_dataset(train_dir, data_config, seed, image_size, retain_pool, tokenizer)
  elif source in SOURCES:
    ds = _two_streams(*streams(data_config, image_size), tokenizer, seed)
  else:
    raise ValueError(f"data.source {source!r}: use one of {', '.join(SOURCES)}")
  # Sliced after the random map (lazily: each process computes only its own share), so the
  # global stream of examples is the same for any number of processes.
  ds = ds[index::count]
  ds = ds.batch(global_batch_size // count, drop_remainder=True)
  it = ds.to_iter_dataset()
  if data_config.workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.workers))
  return iter(it)


def _records_dataset(train_dir, data_config, seed, image_size, retain_pool, tokenizer):
  ds = grain.MapDataset.source(records.training_source(train_dir)).shuffle(seed=seed).repeat()
  fresh, weights = data_config.get("fresh_mcq", False), data_config.get("mcq_answer_weights")
  if weights and not fresh:
    raise ValueError("data.mcq_answer_weights applies to drawn MCQs: set data.fresh_mcq=True")
  return ds.random_map(TrainingExample(data_config.captions, tokenizer, image_size, fresh,
                                       tuple(weights) if weights else None, retain_pool),
                       seed=seed)


def streams(data_config, image_size):
  """(caption source or None, MCQ source or None) of a two-stream `data.source`.

  official_csv: `data.caption_csv` (columns `data.image_column` / `data.caption_column`,
  separator `data.separator`) and `data.mcq_csv`, either may be empty. webdataset:
  `data.shards` (a brace pattern) for captions, `data.mcq_csv` optional. converted: the
  `captions` / `mcq` splits that `negjax.data.convert` wrote under `data.dir`."""
  from negjax.data import official
  source = data_config.source
  captions_, mcq = None, None
  if source == "official_csv":
    if data_config.get("caption_csv"):
      table = official.read_captions(
          data_config.caption_csv, data_config.get("image_column", "filepath"),
          data_config.get("caption_column", "title"), data_config.get("separator", "\t"),
          data_config.get("image_root"))
      official.report_skips(table)
      captions_ = official.CaptionSource(table, image_size)
  elif source == "webdataset":
    from negjax.data import webdataset
    shard_index = webdataset.index(data_config.shards)
    official.report_skips(official.Table(data_config.shards, shard_index.samples,
                                         shard_index.skipped))
    captions_ = webdataset.Source(shard_index, image_size)
  elif source == "converted":
    from negjax.data import convert
    captions_, mcq = (convert.training_source(data_config.dir, split, image_size)
                      for split in convert.SPLITS)
  if source != "converted" and data_config.get("mcq_csv"):
    table = official.read_mcq(data_config.mcq_csv, data_config.get("image_root"))
    official.report_skips(table)
    mcq = official.MCQSource(table, image_size)
  if captions_ is None and mcq is None:
    raise ValueError(f"data.source={source}: no caption or MCQ data configured")
  return captions_, mcq


def input_paths(data_config):
  """The files a two-stream `data.source` reads (for provenance)."""
  source = data_config.get("source", "records")
  if source == "webdataset":
    from negjax.data import webdataset
    paths = webdataset.expand(data_config.shards)
  elif source == "converted":
    paths = [data_config.dir]
  else:
    paths = [data_config.get("caption_csv")]
  mcq = [] if source == "converted" else [data_config.get("mcq_csv")]  # (converted: its own)
  return [p for p in paths + mcq if p]


class CaptionExample(grain.transforms.Map):
  """{"image", "caption"} -> {"image", "caption_ids"}; `text`: a `Tokenizer` or a length."""

  def __init__(self, text):
    self.tokenize = _as_tokenizer(text)

  def map(self, example):
    return {"image": example["image"], "caption_ids": self.tokenize([example["caption"]])[0]}


class MCQExample(CaptionExample):
  """{"image", "options", "answer"} -> {"mcq_image", "mcq_ids", "mcq_answer"}."""

  def map(self, example):
    return {"mcq_image": example["image"],
            "mcq_ids": self.tokenize(list(example["options"])),
            "mcq_answer": np.int32(example["answer"])}


class _Zip(grain.transforms.MapWithIndex):
  """Adds element `index` of another (infinite) dataset: two streams in one index space,
  so one iterator position (in every checkpoint) restores both."""

  def __init__(self, other):
    self.other = other

  def map_with_index(self, index, element):
    return {**element, **self.other[index]}


def _two_streams(captions_, mcq, tokenizer, seed):
  """Caption rows and MCQ rows of other images, each shuffled on its own (seeds differ), so
  a step of batch B sees 2B images, as the official NegFull training does."""
  def stream(source, example, stream_seed):
    return grain.MapDataset.source(source).shuffle(seed=stream_seed).repeat().map(
        example(tokenizer))
  parts = [stream(s, e, seed + k) for k, (s, e) in
           enumerate(((captions_, CaptionExample), (mcq, MCQExample))) if s is not None]
  return parts[0] if len(parts) == 1 else parts[0].map_with_index(_Zip(parts[1]))


TEXT_FIELDS = ("caption_ids", "mcq_ids", "retain_ids")


def trim_text(batch, multiple):
  """Cuts caption and option ids to the longest text of the *global* batch, rounded up to
  `multiple` (0: keep the configured length). Exact (see `tokenizer.used_length`); every
  process gets the same lengths, and each new length compiles the step once."""
  if not multiple:
    return batch
  fields = [k for k in TEXT_FIELDS if k in batch]  # the same keys on every process
  lengths = np.array([used_length(batch[k], multiple) for k in fields])
  lengths = np.asarray(sharding.to_host(lengths)).reshape(-1, len(fields)).max(0)
  return dict(batch, **{k: batch[k][..., :n] for k, n in zip(fields, lengths)})
