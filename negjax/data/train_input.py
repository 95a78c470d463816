"""Training input: Grain over the data engine's ArrayRecord shards.

shuffle (a new order each epoch) -> repeat -> this process's slice -> per-example caption
choice and tokenization (seeded by index, so a restored iterator replays exactly) ->
batch -> optional worker processes. The iterator's state goes into every checkpoint.
`trim_text` then cuts each batch's text padding before it goes to the devices.
"""
import dataclasses
import glob
import os

import grain
import jax
import numpy as np
from PIL import Image

from negjax import sharding
from negjax.data import captions, records
from negjax.tokenizer import tokenize, used_length

CACHE_DIR = os.path.expanduser(os.environ.get("NEGJAX_CACHE", "~/.cache/negjax"))


@dataclasses.dataclass(frozen=True)
class TrainingData:
  train_dir: str  # ArrayRecord shards
  eval_root: str  # NegBench-format CSVs (and their images)
  eval_files: tuple  # the CSVs under eval_root


def prepare(data_config, seed: int) -> TrainingData:
  """The configured data folder, or the shapes world (`data_config.shapes`, a data-engine
  config) built once into the cache, in a folder named by everything that shapes its
  content (`make.fingerprint`: the settings and the engine version), so that a changed
  caption engine never serves an old world."""
  directory = data_config.dir
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
  `mcq_answer_weights`) instead of the stored one: more distinct questions per image."""

  def __init__(self, pools, text_length, image_size, fresh_mcq=False, mcq_answer_weights=None):
    self.pools = tuple(pools)
    self.text_length = text_length
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
    return {
        "image": image,
        "caption_ids": tokenize([caption], self.text_length)[0],
        "mcq_ids": tokenize(options, self.text_length),
        "mcq_answer": np.int32(answer),
    }


def make_iterator(train_dir, data_config, global_batch_size, seed, image_size):
  """A checkpointable iterator of this process's share of each global batch."""
  source = records.training_source(train_dir)
  n_proc = jax.process_count()
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  fresh, weights = data_config.get("fresh_mcq", False), data_config.get("mcq_answer_weights")
  if weights and not fresh:
    raise ValueError("data.mcq_answer_weights applies to drawn MCQs: set data.fresh_mcq=True")
  ds = ds.random_map(TrainingExample(data_config.captions, data_config.text_length, image_size,
                                     fresh, tuple(weights) if weights else None), seed=seed)
  # Sliced after the random map (lazily: each process computes only its own share), so the
  # global stream of examples is the same for any number of processes.
  ds = ds[jax.process_index()::n_proc]
  ds = ds.batch(global_batch_size // n_proc, drop_remainder=True)
  it = ds.to_iter_dataset()
  if data_config.workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.workers))
  return iter(it)


TEXT_FIELDS = ("caption_ids", "mcq_ids")


def trim_text(batch, multiple):
  """Cuts caption and option ids to the longest text of the *global* batch, rounded up to
  `multiple` (0: keep the configured length). Exact (see `tokenizer.used_length`); every
  process gets the same lengths, and each new length compiles the step once."""
  if not multiple:
    return batch
  lengths = np.array([used_length(batch[k], multiple) for k in TEXT_FIELDS])
  lengths = np.asarray(sharding.to_host(lengths)).reshape(-1, len(TEXT_FIELDS)).max(0)
  return dict(batch, **{k: batch[k][..., :n] for k, n in zip(TEXT_FIELDS, lengths)})
