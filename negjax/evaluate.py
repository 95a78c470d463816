"""NegBench evaluation: `python -m negjax.evaluate --config configs/negbench.py ...`.

Reads and checks every NegBench CSV first (a bad third file must not cost the first
two), then encodes each file's media (Grain workers decode and preprocess) and texts with
one jitted function per tower, scores with `negjax.metrics`, and writes WORKDIR/results.json
({"provenance": ..., "results": {file key: metrics}}), WORKDIR/results.csv (official metric
names) and WORKDIR/mcq_accuracy.png after every file. A rerun with the same checkpoint and
settings skips the files already there. The trainer calls `evaluate_files` with an
in-memory model.
"""
import csv
import datetime
import functools
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from negjax import atomic, cli, metrics, provenance, sharding
from negjax.data import eval_input, negbench
from negjax.tokenizer import tokenize, used_length


@functools.partial(jax.jit, static_argnums=0)
def _encode_image(graphdef, state, images):
  return nnx.merge(graphdef, state).encode_image(images)


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(graphdef, state, ids):
  return nnx.merge(graphdef, state).encode_text(ids)


class Encoders:
  """The model split once; each tower is a jitted pure function of (state, inputs), keyed
  by the model's structure, so models of one architecture (a leaderboard of fine-tunes)
  share their compilations."""

  def __init__(self, model):
    self.graphdef, self.state = nnx.split(model)
    self.image_size = model.config.image_size
    self.context_length = model.config.context_length
    # The model's own text and image input where it has them (SigLIP), else CLIP's.
    self.tokenize = getattr(model, "tokenize", None)
    self.transforms = getattr(model, "image_transforms", None)
    # What this model's media batches depend on (eval_input.media_batches' inputs): models
    # with equal keys are given the same decoded batches (negjax.leaderboard).
    self.media_key = (self.image_size, self.transforms)

  def image(self, images):
    return _encode_image(self.graphdef, self.state, images)

  def text(self, ids):
    return _encode_text(self.graphdef, self.state, ids)


def frame_mean(x, count):
  """Video embeddings [B, D] from frame embeddings x [B, F, D], as the official code makes
  them: each frame's embedding L2-normalised, then the mean over the clip's `count` [B]
  real frames (the rest is padding). Scoring normalises the mean again."""
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  real = (jnp.arange(x.shape[1]) < jnp.asarray(count)[:, None])[..., None]
  return jnp.where(real, x, 0).sum(1) / jnp.maximum(real.sum(1), 1)


def encode_media(enc, paths, batch_size, frames=1, workers=0, desc=None):
  """Features [N, D] of every path (a mean over frames for videos) and the skip list.

  Returns (features, ok [N] bool, skipped [{"path", "error"}]). Raises on a
  decompression bomb, naming the file.
  """
  (result,) = encode_media_shared([enc], paths, batch_size, frames, workers, desc)
  if isinstance(result, Exception):
    raise result
  return result


def encode_media_shared(encs, paths, batch_size, frames=1, workers=0, desc=None, batches=None):
  """`encode_media` for several models that take the same input (equal `media_key`):
  each batch is decoded once and encoded by every model. Returns one result per model; a
  model whose encoder raised gets that exception instead and is not run again. `batches`:
  (iterable, steps) of `eval_input.media_batches` for these paths, decoded already (the
  leaderboard's cache)."""
  from tqdm import tqdm
  if len({enc.media_key for enc in encs}) != 1:
    raise ValueError(f"models take different inputs: {[enc.media_key for enc in encs]}")
  batches, steps = batches or eval_input.media_batches(
      paths, encs[0].image_size, batch_size, frames, workers,
      getattr(encs[0], "transforms", None))
  feats, failed = [[] for _ in encs], [None] * len(encs)
  index, status, skipped = [], [], []
  for batch in tqdm(batches, total=steps, desc=desc, leave=False, disable=desc is None):
    for i, s, e in zip(batch["index"], batch["status"], batch["error"]):
      if s == eval_input.BOMB:
        raise cli.UserError(f"refused: {e}")
      if s == eval_input.UNREADABLE:
        skipped.append({"path": paths[i], "error": str(e)})
    images = batch["image"]
    b, f = images.shape[:2]
    pixels = jnp.asarray(images.reshape((b * f,) + images.shape[2:]))
    for j, enc in enumerate(encs):
      if failed[j] is None:
        try:
          x = enc.image(pixels).reshape(b, f, -1)
          feats[j].append(x[:, 0] if f == 1 else frame_mean(x, batch["frames"]))
        except Exception as e:  # this model is out; the others go on
          failed[j] = e
    if all(e is not None for e in failed):
      return failed
    index.append(batch["index"])
    status.append(batch["status"])
  # each process's share, concatenated over processes
  index, status = (np.asarray(sharding.to_host(np.concatenate(x))) for x in (index, status))
  real = index >= 0
  skipped.sort(key=lambda x: x["path"])
  results = []
  for model_feats, error in zip(feats, failed):
    if error is None:
      try:
        model_feats = np.asarray(sharding.to_host(jnp.concatenate(model_feats)))
      except Exception as e:  # errors of asynchronous dispatch surface here
        error = e
    if error is not None:
      results.append(error)
      continue
    out = np.zeros((len(paths), model_feats.shape[1]), np.float32)
    ok = np.zeros(len(paths), bool)
    out[index[real]] = model_feats[real]
    ok[index[real]] = status[real] == eval_input.OK
    results.append((out, ok, list(skipped)))
  return results


def encode_texts(enc, texts, batch_size):
  """Features [N, D] of a list of strings, encoded in static-shape batches."""
  if hasattr(enc, "texts"):  # texts scored by a search baseline (negjax.search.baselines)
    return enc.texts(texts, batch_size)
  if getattr(enc, "tokenize", None):  # the model's own tokenizer, ids of the length it takes
    ids = enc.tokenize(texts)
  else:
    ids = tokenize(texts, context_length=enc.context_length)
    ids = ids[:, :used_length(ids)]  # exact: padding after the longest text is never read
  feats = []
  for chunk, n in eval_input.text_batches(ids, batch_size):
    feats.append(enc.text(jnp.asarray(chunk))[:n])
  return np.asarray(jnp.concatenate(feats))[:len(texts)]


def _frames(paths):
  return negbench.FRAMES_PER_VIDEO if any(negbench.is_video(p) for p in paths) else 1


MAX_SKIPPED_FRACTION = 0.01  # default share of unreadable media a file may have


def check_skipped(file, total, skipped, max_fraction):
  """Skipped items shrink the denominators, so a file with none scorable, or more than
  `max_fraction` skipped, is an error rather than a quietly different number."""
  if not skipped:
    return
  first = f"first: {skipped[0]['path']}: {skipped[0]['error']}"
  if len(skipped) >= total:
    raise cli.UserError(f"{file}: nothing to score: none of its {total} media files can be "
                        f"read ({first}); is data_root right?")
  if len(skipped) > max_fraction * total:
    raise cli.UserError(
        f"{file}: {len(skipped)} of {total} media files cannot be read "
        f"({len(skipped) / total:.1%} > max_skipped_fraction={max_fraction}; {first}); "
        "fix the paths, or raise max_skipped_fraction to score the rest")


def check_finite(file, image, text):
  """A NaN/Inf embedding compares as a silent wrong answer (argmax, ranks), so it stops
  the run, saying how many items it hit."""
  bad_image = int((~np.isfinite(np.asarray(image, np.float32)).all(-1)).sum())
  bad_text = int((~np.isfinite(np.asarray(text, np.float32)).all(-1)).sum())
  if bad_image or bad_text:
    raise cli.UserError(
        f"{file}: the model gave non-finite (NaN/Inf) features for {bad_image} of "
        f"{len(image)} images/videos and {bad_text} of {len(text)} texts; the checkpoint "
        "(NaN weights?) or the dtype is broken")


def evaluate_mcq(enc, ds, batch_size, workers=0, progress=True,
                 max_skipped_fraction=MAX_SKIPPED_FRACTION, media=None):
  """`media`: the file's `encode_media` result when it was encoded already."""
  image, ok, skipped = media or encode_media(
      enc, ds.paths, batch_size, _frames(ds.paths), workers,
      desc=os.path.basename(ds.file) if progress else None)
  check_skipped(ds.file, len(ds.paths), skipped, max_skipped_fraction)
  n, o = len(ds.options), len(ds.options[0])
  options = encode_texts(enc, [t for row in ds.options for t in row], batch_size)
  check_finite(ds.file, image[ok], options)
  logits = metrics.mcq_logits(jnp.asarray(image), jnp.asarray(options.reshape(n, o, -1)))
  counts = metrics.mcq_counts(logits, jnp.asarray(ds.answer), jnp.asarray(ds.question_type),
                              jnp.asarray(ds.option_types), jnp.asarray(ok))
  out = metrics.mcq_summary(counts, binary=ds.kind == "binary_mcq")
  out.update(kind=ds.kind, num_skipped=len(skipped), skipped=skipped)
  return out


def evaluate_retrieval(enc, ds, batch_size, workers=0, progress=True,
                       max_skipped_fraction=MAX_SKIPPED_FRACTION, tie_rule="official",
                       media=None):
  """Items whose media cannot be read are left out together with their captions.
  `media`: the file's `encode_media` result when it was encoded already."""
  image, ok, skipped = media or encode_media(
      enc, ds.paths, batch_size, _frames(ds.paths), workers,
      desc=os.path.basename(ds.file) if progress else None)
  check_skipped(ds.file, len(ds.paths), skipped, max_skipped_fraction)
  kept = np.flatnonzero(ok)
  texts = [c for i in kept for c in ds.captions[i]]
  owner = np.repeat(np.arange(len(kept)), [len(ds.captions[i]) for i in kept])
  text = encode_texts(enc, texts, batch_size)
  check_finite(ds.file, image[kept], text)
  out = metrics.recall_at_k(metrics.retrieval_ranks(text, image[kept], owner, tie_rule))
  out.update(kind=ds.kind, num_items=int(len(kept)), num_captions=len(texts),
             num_skipped=len(skipped), skipped=skipped)
  return out


def evaluate_set(enc, ds, batch_size, workers=0, progress=True,
                 max_skipped_fraction=MAX_SKIPPED_FRACTION, tie_rule="official", media=None):
  """Metrics of one dataset of `read_files`, retrieval or MCQ by its kind."""
  if isinstance(ds, negbench.RetrievalSet):
    return evaluate_retrieval(enc, ds, batch_size, workers, progress, max_skipped_fraction,
                              tie_rule, media)
  return evaluate_mcq(enc, ds, batch_size, workers, progress, max_skipped_fraction, media)


def _locate(name, data_root):
  """Absolute path of a `files` entry: as given, else under `data_root`; both existing
  and different is ambiguous."""
  name = os.path.expanduser(name)
  here = os.path.abspath(name)
  if os.path.isabs(name) or not data_root:
    return here
  there = os.path.abspath(os.path.join(data_root, name))
  if os.path.exists(here) and os.path.exists(there) and not os.path.samefile(here, there):
    raise cli.UserError(f"{name}: both {here} and {there} exist; give an absolute path")
  return here if os.path.exists(here) else there


def read_files(files, data_root=None, max_skipped_fraction=MAX_SKIPPED_FRACTION):
  """Reads and checks every file before anything is encoded: {absolute CSV path: dataset}.

  `files`: a list or a comma-separated string (spaces around names are ignored); empty:
  every NegBench CSV under `data_root`. Relative names are taken from the working folder
  or `data_root`. Media that do not exist count against `max_skipped_fraction` here already.
  """
  if isinstance(files, str):
    files = files.split(",")
  files = [f.strip() for f in files or [] if f.strip()]
  if not files:
    if not data_root:
      raise cli.UserError("give files or a data_root to search for NegBench CSVs")
    files = negbench.find_files(data_root)
    if not files:
      raise cli.UserError(f"no NegBench CSV found under {data_root}")
  sets = {}
  for name in files:
    path = _locate(name, data_root)
    if path not in sets:
      sets[path] = ds = negbench.read(path, data_root)
      missing = [{"path": p, "error": "file not found"} for p in ds.paths
                 if not os.path.exists(p)]
      check_skipped(path, len(ds.paths), missing, max_skipped_fraction)
  return sets


def file_keys(paths):
  """Results key of each CSV path: its stem; files sharing a stem get their folders,
  relative to the folder they share ("a/x", "b/x"), so none overwrites another."""
  groups = {}
  for path in dict.fromkeys(paths):
    groups.setdefault(os.path.splitext(os.path.basename(path))[0], []).append(path)
  keys = {}
  for stem, group in groups.items():
    common = os.path.commonpath([os.path.dirname(p) for p in group])
    for path in group:
      keys[path] = stem if len(group) == 1 else os.path.splitext(
          os.path.relpath(path, common))[0].replace(os.sep, "/")
  if len(set(keys.values())) < len(keys):
    raise cli.UserError(f"files whose names differ only in their extension: {sorted(keys)}")
  return keys


def _on_process_0(action):
  """`action()` on process 0 only; a user error there is raised on every process, so no
  host waits forever for one that stopped."""
  value = error = None
  if jax.process_index() == 0:
    try:
      value = action()
    except cli.UserError as e:
      error = e
  if sharding.process_0_says(error is not None):
    raise error or cli.UserError("process 0 stopped on an error about the workdir (see its log)")
  return value


def _report(key, m):
  if m.get("num_skipped"):
    unit = "questions" if "num_questions" in m else "items"
    scored = m.get("num_questions", m.get("num_items"))
    print(f"warning: {key}: skipped {m['num_skipped']} of {scored + m['num_skipped']} {unit} "
          "whose media cannot be read (listed in results.json)", file=sys.stderr, flush=True)


def evaluate_sets(model, sets, batch_size=64, workers=0, progress=True, tie_rule="official",
                  max_skipped_fraction=MAX_SKIPPED_FRACTION, out=None, baseline="plain",
                  alpha=1.0):
  """Metrics of each dataset of `read_files`, by file key. With `out` (a `Workdir`),
  each file's metrics are written as soon as it is done, and files done by an earlier
  run of the same checkpoint and settings are taken from there, not evaluated again.
  `baseline`/`alpha`: how texts are scored (negjax.search.baselines; "plain" is CLIP's)."""
  if out is not None:
    out.plan(list(sets))
  keys = out.keys() if out is not None else file_keys(list(sets))
  done = sharding.process_0_says(  # only process 0 reads the workdir
      [out is not None and out.done(p, max_skipped_fraction) for p in sets])
  enc = Encoders(model)
  if baseline != "plain":
    from negjax.search import baselines
    enc = baselines.Scored(enc, baseline, alpha)
  results = {}
  for (path, ds), already in zip(sets.items(), done):
    key = keys[path]
    if already:
      if out is not None:
        results[key] = out.metrics(path)
        print(f"{key}: already in {out.path} (same checkpoint and settings), not evaluated")
      continue
    m = evaluate_set(enc, ds, batch_size, workers, progress, max_skipped_fraction, tie_rule)
    if baseline != "plain":  # how many texts the template grammar split; the rest: plain
      m.update(baseline=baseline, decomposed_texts=enc.take_count())  # alpha: provenance
    results[key] = m
    _report(key, m)
    if progress:
      print(f"{key}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()
                                   if isinstance(v, float)))
    if out is not None:
      out.add(path, len(ds.paths), m)
  return results


def evaluate_files(model, files, data_root=None, batch_size=64, workers=0, progress=True,
                   tie_rule="official", max_skipped_fraction=MAX_SKIPPED_FRACTION,
                   baseline="plain", alpha=1.0):
  """Metrics for each NegBench file, by file key (the stem, see `file_keys`). `files`
  may be None/empty to use every NegBench CSV under `data_root`; relative files are
  taken from `data_root`. Every file is read and checked before any is encoded."""
  sets = read_files(files, data_root, max_skipped_fraction)
  return evaluate_sets(model, sets, batch_size, workers, progress, tie_rule,
                       max_skipped_fraction, baseline=baseline, alpha=alpha)


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
  """Flat {"coco-negated-image_retrieval_recall@5": value, "coco-negated-num_skipped": 0,
  ...}: metrics (floats) and counts (ints). A key with folders ("a/x") keeps them."""
  flat = {}
  for file_key, m in results.items():
    folder, stem = os.path.split(file_key)
    prefix = f"{folder}/{result_prefix(stem)}" if folder else result_prefix(stem)
    for key, value in m.items():
      if isinstance(value, bool) or not isinstance(value, (float, int)):
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


def _format(value):
  return f"{value:.6f}" if isinstance(value, float) else str(value)


def write_results(results, workdir, run_provenance=None):
  """results.json ({"provenance", "results"}), results.csv (metric,value rows with the
  official names, counts included) and mcq_accuracy.png; each file replaced atomically."""
  os.makedirs(workdir, exist_ok=True)
  doc = {"provenance": run_provenance or {}, "results": results}
  atomic.write_json(os.path.join(workdir, "results.json"), doc)

  def rows(f):
    w = csv.writer(f)
    w.writerow(["metric", "value"])
    for key, value in official_names(results).items():
      w.writerow([key, _format(value)])
  atomic.write(os.path.join(workdir, "results.csv"), rows, newline="")
  plot_mcq(results, os.path.join(workdir, "mcq_accuracy.png"))


# What must match for an earlier run's results to be reused (results.json "provenance").
_SAME_RUN = ("negjax_version", "checkpoint_sha256", "architecture", "dtype", "settings")


def _run_identity(p):
  return {"negjax_version": p.get("negjax_version"),
          "checkpoint_sha256": (p.get("checkpoint") or {}).get("sha256"),
          "architecture": p.get("architecture"), "dtype": p.get("dtype"),
          "settings": p.get("settings")}


class Workdir:
  """WORKDIR's outputs, rewritten after every file, so an interrupted run keeps what it
  finished and a rerun skips it. Results of another checkpoint or other settings are
  never mixed in or overwritten: that is an error."""

  def __init__(self, path):
    self.path = path
    self.entries = {}  # CSV path -> (file record, metrics)
    self.planned = []
    self.run = None
    try:
      os.makedirs(path, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=path, prefix=".negjax-write-test"):
        pass
    except OSError as e:
      raise cli.UserError(f"workdir {path}: cannot write there: {e.strerror or e}") from e
    self.previous = self._load()

  def _load(self):
    file = os.path.join(self.path, "results.json")
    if not os.path.exists(file):
      return None
    try:
      with open(file) as f:
        doc = json.load(f)
    except ValueError as e:
      raise cli.UserError(f"{file}: not valid JSON ({e}); move it away or use another "
                          "workdir") from e
    if not (isinstance(doc, dict) and "provenance" in doc and "results" in doc):
      raise cli.UserError(f"{file}: no provenance (an older negjax wrote it?); move it away "
                          "or use another workdir")
    return doc

  def start(self, run_provenance):
    """`run_provenance`: `provenance.record(...)` of this run, `settings` included."""
    self.run = run_provenance
    if self.previous is None:
      return
    old, new = _run_identity(self.previous["provenance"]), _run_identity(run_provenance)
    changed = [f"{k}: {old[k]} -> {new[k]}" for k in _SAME_RUN if old[k] != new[k]]
    if changed:
      raise cli.UserError(f"{os.path.join(self.path, 'results.json')} holds results of another "
                          f"run ({'; '.join(changed)}); use another workdir or move it away")
    for record in self.previous["provenance"].get("data", []):
      if record.get("key") in self.previous["results"]:
        self.entries[record["path"]] = (record, self.previous["results"][record["key"]])

  def plan(self, paths):
    self.planned = list(paths)

  def keys(self):
    return file_keys(list(self.entries) + self.planned)

  def done(self, path, max_skipped_fraction):
    """True if `path`, unchanged since, was scored by this run's checkpoint and settings
    within the current skip limit."""
    if path not in self.entries:
      return False
    record, m = self.entries[path]
    if record.get("sha256") != provenance.sha256(path):
      return False
    total = m.get("num_questions", m.get("num_items", 0)) + m.get("num_skipped", 0)
    return m.get("num_skipped", 0) <= max_skipped_fraction * total

  def metrics(self, path):
    return self.entries[path][1]

  def add(self, path, rows, m):
    record = provenance.file_record(path, rows=rows)
    record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    self.entries[path] = (record, m)
    keys = self.keys()
    data = [dict(record, key=keys[p]) for p, (record, _) in self.entries.items()]
    results = {keys[p]: m for p, (_, m) in self.entries.items()}
    write_results(results, self.path, dict(self.run, data=data))


def check_config(c):
  """Config values that would fail late, or silently mean something else."""
  if c.checkpoint and c.get("checkpoints"):
    raise cli.UserError("set --config.checkpoint (one model) or --config.checkpoints (a "
                        "leaderboard), not both")
  if not c.checkpoint and not c.get("checkpoints"):
    raise cli.UserError("set --config.checkpoint (a weights file, folder or openai:ARCH)")
  if not c.workdir:
    raise cli.UserError("set --config.workdir (where results are written)")
  for name, low in (("batch_size", 1), ("workers", 0)):
    value = c[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise cli.UserError(f"config.{name} must be an integer >= {low}, got {value!r}")
  if c.tie_rule not in metrics.TIE_RULES:
    raise cli.UserError(f"config.tie_rule must be one of {', '.join(metrics.TIE_RULES)}, "
                        f"got {c.tie_rule!r}")
  if not 0 <= c.max_skipped_fraction <= 1:
    raise cli.UserError(f"config.max_skipped_fraction must be in [0, 1], got "
                        f"{c.max_skipped_fraction}")
  try:
    jnp.dtype(c.dtype)
  except TypeError:
    raise cli.UserError(f"config.dtype {c.dtype!r} is not a dtype (e.g. float32, "
                        "bfloat16)") from None
  from negjax.search import baselines
  baselines.check(c.get("baseline", "plain"), c.get("alpha", 1.0))


def _baseline(c):
  """The text-scoring baseline's settings; none for plain CLIP scoring, so plain runs keep
  the settings (and reuse the results) of runs made before baselines existed."""
  baseline = c.get("baseline", "plain")
  return {} if baseline == "plain" else {"baseline": baseline, "alpha": float(c.alpha)}


def run_provenance(c, checkpoint, arch, model):
  """What results.json records of a run of `model` (loaded from `checkpoint`, `arch` as
  the user gave it) under config `c`; a rerun reuses results only where it matches."""
  from negjax.models import clip, weights
  data_root = c.data_root or None
  arch = arch or clip.architecture_name(model.config) or model.config.architecture
  return provenance.record(  # openai:NAME: its cached file, hashed
      checkpoint=weights.resolve(checkpoint), architecture=arch, dtype=c.dtype,
      settings={"tie_rule": c.tie_rule, "data_root": data_root and os.path.abspath(data_root),
                **_baseline(c)})


def run(c):
  """The command, in the order that loses nothing: config, every CSV, the workdir, the
  checkpoint, then one file at a time, each written when done. With `checkpoints`: the
  leaderboard of several models (negjax.leaderboard)."""
  from negjax.models import weights
  check_config(c)
  if c.get("checkpoints"):
    from negjax import leaderboard
    return leaderboard.run(c)
  data_root = c.data_root or None
  sets = read_files(c.files, data_root, c.max_skipped_fraction)
  out = _on_process_0(lambda: Workdir(c.workdir))
  model = weights.load_model(c.checkpoint, arch=c.arch or None, dtype=jnp.dtype(c.dtype))
  _on_process_0(lambda: out.start(run_provenance(c, c.checkpoint, c.arch, model)))
  results = evaluate_sets(model, sets, c.batch_size, c.workers, True, c.tie_rule,
                          c.max_skipped_fraction, out, **_baseline(c))
  if out is not None:
    print(f"wrote {os.path.join(c.workdir, 'results.json')}")
    for key, value in official_names(results).items():
      print(f"  {key:60s} {_format(value)}")
  return results


def main(argv):
  del argv
  run(_CONFIG.value)


if __name__ == "__main__":
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/negbench.py")
  cli.run(main)
