"""NegBench evaluation: `python -m negjax.evaluate --config configs/negbench.py ...`.

Reads each NegBench CSV, encodes its media (Grain workers decode and preprocess) and
texts with one jitted function per tower, scores with `negjax.metrics`, and writes
WORKDIR/results.json (file stem -> metrics, skipped images, confusion table),
WORKDIR/results.csv (official metric names) and WORKDIR/mcq_accuracy.png.
The trainer calls `evaluate_files` with an in-memory model.
"""
import csv
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from negjax import metrics, sharding
from negjax.data import eval_input, negbench
from negjax.tokenizer import tokenize, used_length


class Encoders:
  """The model split once; each tower is a jitted pure function of (state, inputs)."""

  def __init__(self, model):
    graphdef, self.state = nnx.split(model)
    self.image_size = model.config.image_size
    self.context_length = model.config.context_length
    self._image = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x))
    self._text = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_text(x))

  def image(self, images):
    return self._image(self.state, images)

  def text(self, ids):
    return self._text(self.state, ids)


def encode_media(enc, paths, batch_size, frames=1, workers=0, desc=None):
  """Features [N, D] of every path (a mean over frames for videos) and the skip list.

  Returns (features, ok [N] bool, skipped [{"path", "error"}]). Raises on a
  decompression bomb, naming the file.
  """
  from tqdm import tqdm
  batches, steps = eval_input.media_batches(paths, enc.image_size, batch_size, frames, workers)
  feats, index, status, skipped = [], [], [], []
  for batch in tqdm(batches, total=steps, desc=desc, leave=False, disable=desc is None):
    for i, s, e in zip(batch["index"], batch["status"], batch["error"]):
      if s == eval_input.BOMB:
        raise ValueError(f"refused: {e}")
      if s == eval_input.UNREADABLE:
        skipped.append({"path": paths[i], "error": str(e)})
    images = batch["image"]
    b, f = images.shape[:2]
    x = enc.image(jnp.asarray(images.reshape((b * f,) + images.shape[2:])))
    feats.append(x.reshape(b, f, -1).mean(1))  # video: mean of frame embeddings
    index.append(batch["index"])
    status.append(batch["status"])
  # each process's share, concatenated over processes
  feats = np.asarray(sharding.to_host(jnp.concatenate(feats)))
  index, status = (np.asarray(sharding.to_host(np.concatenate(x))) for x in (index, status))
  out = np.zeros((len(paths), feats.shape[1]), np.float32)
  ok = np.zeros(len(paths), bool)
  real = index >= 0
  out[index[real]] = feats[real]
  ok[index[real]] = status[real] == eval_input.OK
  skipped.sort(key=lambda x: x["path"])
  return out, ok, skipped


def encode_texts(enc, texts, batch_size):
  """Features [N, D] of a list of strings, encoded in static-shape batches."""
  ids = tokenize(texts, context_length=enc.context_length)
  ids = ids[:, :used_length(ids)]  # exact: padding after the longest text is never read
  feats = []
  for chunk, n in eval_input.text_batches(ids, batch_size):
    feats.append(enc.text(jnp.asarray(chunk))[:n])
  return np.asarray(jnp.concatenate(feats))[:len(texts)]


def _frames(paths):
  return negbench.FRAMES_PER_VIDEO if any(negbench.is_video(p) for p in paths) else 1


def evaluate_mcq(enc, ds, batch_size, workers=0, progress=True):
  image, ok, skipped = encode_media(enc, ds.paths, batch_size, _frames(ds.paths), workers,
                                    desc=os.path.basename(ds.file) if progress else None)
  n, o = len(ds.options), len(ds.options[0])
  options = encode_texts(enc, [t for row in ds.options for t in row], batch_size)
  logits = metrics.mcq_logits(jnp.asarray(image), jnp.asarray(options.reshape(n, o, -1)))
  counts = metrics.mcq_counts(logits, jnp.asarray(ds.answer), jnp.asarray(ds.question_type),
                              jnp.asarray(ds.option_types), jnp.asarray(ok))
  out = metrics.mcq_summary(counts, binary=ds.kind == "binary_mcq")
  out.update(kind=ds.kind, num_skipped_images=len(skipped), skipped_images=skipped)
  return out


def evaluate_retrieval(enc, ds, batch_size, workers=0, progress=True):
  """Items whose media cannot be read are left out together with their captions."""
  image, ok, skipped = encode_media(enc, ds.paths, batch_size, _frames(ds.paths), workers,
                                    desc=os.path.basename(ds.file) if progress else None)
  kept = np.flatnonzero(ok)
  if not len(kept):
    raise ValueError(f"{ds.file}: no readable image or video")
  texts = [c for i in kept for c in ds.captions[i]]
  owner = np.repeat(np.arange(len(kept)), [len(ds.captions[i]) for i in kept])
  text = encode_texts(enc, texts, batch_size)
  out = metrics.recall_at_k(metrics.retrieval_ranks(text, image[kept], owner))
  out.update(kind=ds.kind, num_items=int(len(kept)), num_captions=len(texts),
             num_skipped_images=len(skipped), skipped_images=skipped)
  return out


def evaluate_files(model, files, data_root=None, batch_size=64, workers=0, progress=True):
  """Metrics for each NegBench file, keyed by file stem. `files` may be None/empty to use
  every NegBench CSV under `data_root`; relative files are taken from `data_root`."""
  if not files:
    if data_root is None:
      raise ValueError("give files or a data_root to search for NegBench CSVs")
    files = negbench.find_files(data_root)
    if not files:
      raise ValueError(f"no NegBench CSV found under {data_root}")
  enc = Encoders(model)
  results = {}
  for file in files:
    if data_root is not None and not os.path.isabs(file) and not os.path.exists(file):
      file = os.path.join(data_root, file)
    ds = negbench.read(file, data_root)
    stem = os.path.splitext(os.path.basename(file))[0]
    run = evaluate_retrieval if isinstance(ds, negbench.RetrievalSet) else evaluate_mcq
    results[stem] = run(enc, ds, batch_size, workers, progress)
    if progress:
      print(f"{stem}: " + ", ".join(f"{k}={v:.4f}" for k, v in results[stem].items()
                                      if isinstance(v, float)))
  return results


# ----------------------------------------------------------------------- outputs

_PREFIXES = (  # official file stem -> dataset prefix of the official result names
    (r"^msr_vtt_retrieval_rephrased", "msrvtt-negated"),
    (r"^msr_vtt_retrieval$", "msrvtt"),
    (r"^(.+?)_val_negated_retrieval", r"\1-negated"),
    (r"^(.+?)_val_retrieval$", r"\1"),
)


def result_prefix(stem):
  """COCO_val_retrieval -> coco, COCO_val_negated_retrieval_... -> coco-negated,
  msr_vtt_retrieval -> msrvtt; any other file keeps its stem."""
  for pattern, replacement in _PREFIXES:
    if re.match(pattern, stem):
      return re.sub(pattern + ".*$", replacement, stem).lower()
  return stem


def official_names(results):
  """Flat {"coco-negated-image_retrieval_recall@5": value, ...}."""
  flat = {}
  for stem, m in results.items():
    prefix = result_prefix(stem)
    for key, value in m.items():
      if not isinstance(value, float):
        continue
      if m.get("kind") == "video_retrieval":
        key = key.replace("image_retrieval", "video_retrieval")
      flat[f"{prefix}-{key}"] = value
  return flat


def plot_mcq(results, path):
  """Bar chart: MCQ accuracy per template type per file."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  mcq = {s: m for s, m in results.items() if "total_accuracy" in m}
  if not mcq:
    return None
  keys = [f"{t}_accuracy" for t in metrics.TEMPLATES] + ["total_accuracy"]
  fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(mcq)), 4))
  width = 0.8 / len(keys)
  for j, key in enumerate(keys):
    values = [mcq[s].get(key, np.nan) for s in mcq]
    ax.bar(np.arange(len(mcq)) + (j - (len(keys) - 1) / 2) * width, values, width,
           label=key.replace("_accuracy", ""))
  ax.set_xticks(np.arange(len(mcq)), list(mcq), rotation=15, fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("MCQ accuracy")
  ax.axhline(0.25, color="grey", lw=0.5, ls="--")  # chance with 4 options
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_results(results, workdir):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["metric", "value"])
    for key, value in official_names(results).items():
      w.writerow([key, f"{value:.6f}"])
  plot_mcq(results, os.path.join(workdir, "mcq_accuracy.png"))


def main(argv):
  del argv
  from negjax.models.checkpoints import load_model
  c = _CONFIG.value
  if not c.checkpoint:
    raise ValueError("set --config.checkpoint")
  model = load_model(c.checkpoint, arch=c.arch or None, dtype=jnp.dtype(c.dtype))
  files = [f for f in (c.files or "").split(",") if f]
  results = evaluate_files(model, files, c.data_root or None, c.batch_size, c.workers)
  if jax.process_index() == 0:
    write_results(results, c.workdir)
    print(f"wrote {os.path.join(c.workdir, 'results.json')}")
    for key, value in official_names(results).items():
      print(f"  {key:60s} {value:.4f}")


if __name__ == "__main__":
  from absl import app
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/negbench.py")
  app.run(main)
