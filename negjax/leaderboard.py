"""NegBench leaderboard: several models on the same files, one table and the paper's figures.

  python -m negjax.evaluate --config configs/negbench.py --config.data_root=DATA \
      --config.checkpoints=openai:ViT-B-32,shapes,runs/negclip/model.safetensors=ViT-B-32 \
      --config.workdir=WORKDIR

Each entry is NAME[=ARCH]: `openai:ARCH`, `shapes` (the shapes-CLIP packaged with negjax),
or a file or folder `negjax.load_model` reads; ARCH where the file does not record it.
Every model is a single-checkpoint evaluation of its own (`negjax.evaluate.Workdir` in
WORKDIR/models/NAME-HASH/: results.json with provenance, results.csv), so a rerun with one
more model evaluates only that one, and a changed checkpoint or setting is refused there as
in a single run. Models are loaded, evaluated on every file and freed one at a time, so
memory holds one model, never the sum. Models that take the same input (image size,
preprocessing: `media_key`) still share the reading of each file: the first decodes each
batch and keeps it in WORKDIR/media_cache-*/ (on disk: NegBench's COCO file at 224 px is
~3 GB of float32 pixels), the others read it back; the cache is removed when the run ends.
A model that cannot be loaded or evaluated gets its one-line error in the table; the others
go on. A problem with the data (unreadable media past `max_skipped_fraction`) stops the run,
as it would stop each single run.

Writes WORKDIR/leaderboard.csv and leaderboard.md (one row per model: official metric
names as columns, an error column), leaderboard_mcq.png (MCQ accuracy per template type,
Affirmation / Negation / Hybrid, per model and MCQ file) and leaderboard_retrieval.png
(text-to-image Recall@5 on original vs negated queries, per model and dataset).
"""
import csv
import dataclasses
import gc
import hashlib
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from negjax import atomic, cli, evaluate, metrics
from negjax.data import eval_input

# Short names of checkpoints that ship with negjax.
PACKAGED = {"shapes": os.path.join(os.path.dirname(__file__), "assets",
                                   "shapes_clip.safetensors")}
# The paper's names of the MCQ template types.
TEMPLATE_LABELS = dict(zip(metrics.TEMPLATES, ("Affirmation", "Negation", "Hybrid")))


@dataclasses.dataclass
class Entry:
  """One model of the leaderboard and what became of it."""
  label: str  # as the user wrote it: the table's row name
  name: str  # what load_model reads (a packaged name already replaced by its file)
  arch: str | None
  folder: str  # its own evaluation workdir
  architecture: str = ""
  enc: object = None
  out: object = None  # evaluate.Workdir
  error: str | None = None


def parse_checkpoints(spec, workdir):
  """`checkpoints` ("A,B=ARCH,...", or a list) -> [Entry]. A name that exists as a path is
  taken whole, even with a "=" in it; otherwise the text after the last "=" is ARCH."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  entries, seen = [], set()
  for item in (i.strip() for i in items):
    if not item:
      continue
    name, arch = item, None
    if not os.path.exists(os.path.expanduser(item)) and "=" in item:
      name, arch = (s.strip() for s in item.rsplit("=", 1))
      if not name or not arch:
        raise cli.UserError(f"checkpoints: {item!r} is not NAME or NAME=ARCH")
    name = PACKAGED.get(name, os.path.expanduser(name))
    identity = f"{os.path.abspath(name) if os.path.exists(name) else name}={arch or ''}"
    if identity in seen:
      raise cli.UserError(f"checkpoints: {item!r} is given twice (same file and arch)")
    seen.add(identity)
    entries.append(Entry(item, name, arch, os.path.join(workdir, "models",
                                                        _folder_name(item, identity))))
  if not entries:
    raise cli.UserError("checkpoints: no model given")
  return entries


def _folder_name(label, identity):
  """Readable and unique: the label's characters that are safe in a file name, and a hash
  of what is loaded (a path made absolute, and the arch), so equal labels differ."""
  readable = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(label.rstrip("/")) or label)
  return f"{readable.strip('_')[:60]}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def one_line(error, limit=300):
  """A table cell: the message on one line (an XLA error can run to pages), cut at `limit`."""
  text = " ".join(str(error).split()) or type(error).__name__
  if not isinstance(error, cli.user_errors()):
    text = f"{type(error).__name__}: {text}"
  return text if len(text) <= limit else text[:limit - 1] + "…"


def architecture_label(record, model):
  """The table's architecture cell: the recorded name, a SigLIP's name (released, else
  spelled from its shapes), else "custom" (a CLIP of shapes no named architecture has)."""
  from negjax.models import siglip
  if isinstance(record["architecture"], str):
    return record["architecture"]
  if isinstance(model, siglip.SigLIP):
    return siglip.architecture_name(model.config)
  return "custom"


def _open(entry, c, paths):
  """Loads the model and opens its workdir; a failure is the entry's error."""
  from negjax.models import weights
  try:
    model = weights.load_model(entry.name, arch=entry.arch, dtype=jnp.dtype(c.dtype))
    record = evaluate.run_provenance(c, entry.name, entry.arch, model)
    entry.architecture = architecture_label(record, model)
    entry.out = evaluate.Workdir(entry.folder)
    entry.out.start(record)
    entry.out.plan(paths)
    entry.enc = evaluate.Encoders(model)
  except Exception as e:  # noqa: BLE001 - any reason a model cannot run goes in its row
    entry.error, entry.enc = one_line(e), None
    print(f"{entry.label}: cannot be evaluated: {entry.error}", flush=True)


class MediaCache:
  """Decoded media batches by (media_key, file), on disk under `workdir`: the first model
  of an input kind decodes a file's batches while it encodes them and keeps them; the next
  models of that kind read them back instead of decoding. A pass that stops early (its
  model failed) keeps nothing. `close` removes the files."""

  def __init__(self, workdir):
    self.root = tempfile.mkdtemp(prefix="media_cache-", dir=workdir)
    self.stored = {}  # (media_key, file) -> [batch dicts, the image arrays as .npy paths]

  def batches(self, key, enc, paths, batch_size, frames, workers, keep):
    """(batches, steps) of eval_input.media_batches for this model's input; from the cache
    when there, else decoded (and kept for later models if `keep`)."""
    if key in self.stored:
      stored = self.stored[key]
      return ({**b, "image": np.load(b["image"])} for b in stored), len(stored)
    batches, steps = eval_input.media_batches(paths, enc.image_size, batch_size, frames,
                                              workers, enc.transforms)
    return (self._keep(key, batches) if keep else batches), steps

  def _keep(self, key, batches):
    folder = tempfile.mkdtemp(dir=self.root)
    stored = []
    for i, batch in enumerate(batches):
      path = os.path.join(folder, f"{i}.npy")
      np.save(path, batch["image"])
      stored.append({**batch, "image": path})
      yield batch
    self.stored[key] = stored  # only a pass that ran to the end is kept

  def close(self):
    shutil.rmtree(self.root, ignore_errors=True)


def evaluate_models(entries, sets, c):
  """Every entry on every dataset of `evaluate.read_files`, one model at a time: loaded,
  run file by file (each file's results land in its workdir), freed before the next is
  loaded. Decoded media are shared through a MediaCache."""
  cache = MediaCache(c.workdir)
  reported = set()  # a file's skips are the file's: said once
  try:
    for i, entry in enumerate(entries):
      _open(entry, c, list(sets))
      if entry.error is None:
        _evaluate_model(entry, sets, c, cache, reported, later=i + 1 < len(entries))
      entry.enc = None  # the model's weights go before the next model is loaded
      gc.collect()
  finally:
    cache.close()


def _evaluate_model(entry, sets, c, cache, reported, later):
  for path, ds in sets.items():
    if entry.out.done(path, c.max_skipped_fraction):
      continue
    frames = evaluate._frames(ds.paths)
    batches = cache.batches((entry.enc.media_key, path), entry.enc, ds.paths, c.batch_size,
                            frames, c.workers, keep=later)
    (media,) = evaluate.encode_media_shared(
        [entry.enc], ds.paths, c.batch_size, frames, c.workers,
        desc=f"{entry.label}: {os.path.basename(path)}", batches=batches)
    if not isinstance(media, Exception):  # the data's problem, not a model's: stops the run
      evaluate.check_skipped(path, len(ds.paths), media[2], c.max_skipped_fraction)
    key = entry.out.keys()[path]
    try:
      if isinstance(media, Exception):
        raise media
      result = evaluate.evaluate_set(entry.enc, ds, c.batch_size, c.workers, False,
                                     c.max_skipped_fraction, c.tie_rule, media=media)
    except Exception as e:  # noqa: BLE001 - this model stops, the others go on
      entry.error = one_line(e)
      print(f"{entry.label}: {key}: failed: {entry.error}", flush=True)
      return
    if path not in reported:
      evaluate._report(key, result)
      reported.add(path)
    print(f"{entry.label}: {key}: " + ", ".join(
        f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)), flush=True)
    entry.out.add(path, len(ds.paths), result)


def table(entries, sets):
  """(columns, rows): per model its label, architecture, official metric values (floats,
  in file order) and error; a metric a model lacks is None."""
  rows, names = [], {}
  for entry in entries:
    values = {}
    if entry.out is not None:
      keys = entry.out.keys()
      done = {keys[p]: entry.out.metrics(p) for p in sets if p in entry.out.entries}
      values = {k: v for k, v in evaluate.official_names(done).items()
                if isinstance(v, float)}
    names.update(dict.fromkeys(values))
    rows.append((entry, values))
  columns = ["model", "architecture", *names, "error"]
  return columns, [[e.label, e.architecture, *(v.get(n) for n in names), e.error or ""]
                   for e, v in rows]


def write_csv(columns, rows, path):
  def write_to(f):
    w = csv.writer(f)
    w.writerow(columns)
    for row in rows:
      w.writerow(["" if v is None else evaluate._format(v) for v in row])
  atomic.write(path, write_to, newline="")


def markdown(columns, rows):
  def cell(v):
    text = "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    return text.replace("|", "\\|")
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---:" if i > 1 and i < len(columns) - 1 else "---"
                          for i in range(len(columns))) + "|"]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def _bars(panels, models, series, path, ylabel, chance=None):
  """One panel per entry of `panels` ({title: {series: [value per model]}}), grouped bars:
  one group per model, one bar per series."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if not panels:
    return None
  fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                           figsize=(max(6, 1.2 * len(models) * len(series) / 2 + 2),
                                    3.2 * len(panels)))
  width = 0.8 / len(series)
  x = np.arange(len(models))
  for ax, (title, values) in zip(axes[:, 0], panels.items()):
    for j, name in enumerate(series):
      ax.bar(x + (j - (len(series) - 1) / 2) * width, values[name], width, label=name)
    ax.set_xticks(x, models, rotation=15, fontsize=8, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if chance is not None:
      ax.axhline(chance, color="grey", lw=0.5, ls="--")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot(columns, rows, workdir):
  """leaderboard_mcq.png and leaderboard_retrieval.png from the table."""
  models = [row[0] + (" (failed)" if row[-1] else "") for row in rows]
  column = {name: [np.nan if row[i] is None else row[i] for row in rows]
            for i, name in enumerate(columns)}
  mcq = {}
  for name in columns:  # "<file>-positive_accuracy": one panel per MCQ file
    for t, label in TEMPLATE_LABELS.items():
      if name.endswith(f"-{t}_accuracy"):
        mcq.setdefault(name[:-len(f"-{t}_accuracy")], {})[label] = column[name]
  mcq = {f"{prefix}: MCQ accuracy by template": {
      label: values.get(label, [np.nan] * len(rows)) for label in TEMPLATE_LABELS.values()}
         for prefix, values in mcq.items()}
  retrieval = {}
  for name in columns:  # "<prefix>[-negated]-image_retrieval_recall@5"
    match = re.match(r"^(.*?)(-negated)?-(image|video)_retrieval_recall@5$", name)
    if match:
      title = f"{match[1]}: text-to-{match[3]} Recall@5"
      retrieval.setdefault(title, {})["negated" if match[2] else "original"] = column[name]
  retrieval = {title: {s: values.get(s, [np.nan] * len(rows)) for s in ("original", "negated")}
               for title, values in retrieval.items()}
  return (_bars(mcq, models, list(TEMPLATE_LABELS.values()),
                os.path.join(workdir, "leaderboard_mcq.png"), "accuracy", chance=0.25),
          _bars(retrieval, models, ["original", "negated"],
                os.path.join(workdir, "leaderboard_retrieval.png"), "Recall@5"))


def run(c):
  """The leaderboard command (negjax.evaluate with `checkpoints`): every CSV checked, then
  model by model (a failure is its row's error). Returns the table: (columns, rows)."""
  if jax.process_count() > 1:
    raise cli.UserError("the leaderboard runs in one process; on several hosts evaluate one "
                        "--config.checkpoint at a time")
  if c.arch:
    raise cli.UserError("config.arch is for one checkpoint; give each model's as NAME=ARCH "
                        "in --config.checkpoints")
  if c.get("baseline", "plain") != "plain":
    raise cli.UserError("the leaderboard scores texts plainly; run config.baseline with one "
                        "--config.checkpoint")
  entries = parse_checkpoints(c.checkpoints, c.workdir)
  sets = evaluate.read_files(c.files, c.data_root or None, c.max_skipped_fraction)
  try:
    os.makedirs(os.path.join(c.workdir, "models"), exist_ok=True)
  except OSError as e:
    raise cli.UserError(f"workdir {c.workdir}: cannot write there: {e.strerror or e}") from e
  evaluate_models(entries, sets, c)
  columns, rows = table(entries, sets)
  write_csv(columns, rows, os.path.join(c.workdir, "leaderboard.csv"))
  text = markdown(columns, rows)
  atomic.write(os.path.join(c.workdir, "leaderboard.md"), lambda f: f.write(text))
  plot(columns, rows, c.workdir)
  print(f"wrote {os.path.join(c.workdir, 'leaderboard.csv')} (.md, _mcq.png, "
        f"_retrieval.png); each model's results in {os.path.join(c.workdir, 'models')}")
  print(text)
  return columns, rows
