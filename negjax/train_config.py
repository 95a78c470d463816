"""The training config: checked before anything is built, saved as WORKDIR/config.json,
and compared with that file when a run resumes.

A resumed run must be the run that was started. A changed key (data, model, loss, optimizer,
seed, batch size, total_steps: the learning-rate schedule depends on it, ...) stops the
resume with the list of changes, unless `allow_config_change=True`: the run then goes on,
the changes are logged (console and metrics.jsonl) and config.json takes the new values.
Keys under `CHANGEABLE` only change how a run is watched, laid out or exported, never what
it computes, and may change freely. data.workers is not among them: the saved iterator
state depends on it.
"""
import json
import math
import os

import jax

from negjax import atomic, cli, sharding

CHANGEABLE = ("workdir", "allow_config_change", "log_every", "checkpoint_every",
              "keep_checkpoints", "mesh.", "model.remat", "data.text_multiple", "eval.",
              "export", "export_dtype", "export_mix", "wise.")
FILE = "config.json"


def validate(config) -> None:
  """Every bad value at once, as one `cli.UserError` line, before any data or model work."""
  c, problems = config, []

  def need(ok, message):
    if not ok:
      problems.append(message)

  def positive(key, value, zero_ok=False):
    ok = isinstance(value, int) and not isinstance(value, bool) and (
        value >= 0 if zero_ok else value > 0)
    need(ok, f"{key} must be {'>= 0' if zero_ok else 'a positive integer'}, got {value!r}")

  def number(key, value, low=0.0, high=math.inf, low_open=False):
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and
          math.isfinite(value) and (value > low if low_open else value >= low) and value <= high)
    bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
    need(ok, f"{key} must be a finite number {bounds}, got {value!r}")

  need(bool(c.workdir), "workdir must be set")
  for key in ("batch_size", "total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    positive(key, c[key])
  positive("eval.every", c.eval.every, zero_ok=True)
  positive("eval.batch_size", c.eval.batch_size)
  for axis in ("data", "fsdp"):
    size = c.mesh[axis]
    need(isinstance(size, int) and (size == -1 or size >= 1),
         f"mesh.{axis} must be -1 (the remaining devices) or >= 1, got {size!r}")
  need(not (c.mesh.data == -1 and c.mesh.fsdp == -1), "at most one of mesh.data and "
       "mesh.fsdp may be -1")

  number("loss.contrastive_weight", c.loss.contrastive_weight)
  number("loss.mcq_weight", c.loss.mcq_weight)
  need(c.loss.contrastive_weight != 0 or c.loss.mcq_weight != 0,
       "loss.contrastive_weight and loss.mcq_weight are both 0: nothing to train")
  number("optim.lr", c.optim.lr, low_open=True)
  positive("optim.warmup_steps", c.optim.warmup_steps, zero_ok=True)
  number("optim.end_ratio", c.optim.end_ratio, high=1.0)
  number("optim.weight_decay", c.optim.weight_decay)
  number("optim.b1", c.optim.b1, high=1.0)
  number("optim.b2", c.optim.b2, high=1.0)
  number("optim.eps", c.optim.eps, low_open=True)
  number("optim.grad_clip", c.optim.grad_clip)

  number("loss.l2_init", c.loss.get("l2_init", 0.0))
  need(c.loss.get("kind", "softmax") in ("softmax", "sigmoid"),
       f"loss.kind must be 'softmax' (CLIP's contrastive loss) or 'sigmoid' (SigLIP's), "
       f"got {c.loss.get('kind')!r}")
  _check_regexes(c.optim, need)
  _check_mix(c, number, need)

  positive("data.text_length", c.data.text_length)
  positive("data.text_multiple", c.data.text_multiple, zero_ok=True)
  positive("data.workers", c.data.workers, zero_ok=True)
  need(bool(c.data.captions), "data.captions must name at least one caption pool")
  weights = c.data.get("mcq_answer_weights")
  if weights:
    need(c.data.get("fresh_mcq", False), "data.mcq_answer_weights applies to drawn MCQs: "
         "set data.fresh_mcq=True")
    need(len(weights) == 3 and all(isinstance(w, (int, float)) and w >= 0 for w in weights)
         and sum(weights) > 0, "data.mcq_answer_weights must be 3 numbers >= 0 (positive, "
         f"negative, hybrid), not all 0, got {tuple(weights)!r}")
  _check_source(c, need)
  for key in ("data.dir", "eval.data_root"):
    path = c[key.split(".")[0]][key.split(".")[1]]
    need(path is None or os.path.isdir(path), f"{key}: no such folder: {path}")

  for key, value in (("model.dtype", c.model.dtype), ("export_dtype", c.export_dtype)):
    need(value in ("float32", "bfloat16", "float16"),
         f"{key} must be float32, bfloat16 or float16, got {value!r}")
  init = c.model.init
  need(init != "random" or c.model.arch, "model.init=random needs model.arch (e.g. "
       "--config.model.arch=negjax-tiny)")
  from negjax.models import weights
  need(init in ("random", "shapes") or weights.is_name(init) or os.path.exists(init),
       f"model.init: no such checkpoint: {init}")
  if c.model.arch:
    from negjax.models import clip
    need(c.model.arch in clip.ARCHITECTURES,
         f"model.arch: unknown architecture {c.model.arch!r}{clip.near_names(c.model.arch)}")
  if problems:
    raise cli.UserError("config: " + "; ".join(problems))


def _check_regexes(optim, need):
  import re
  pairs = optim.get("lr_mults") or ()
  shaped = all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs)
  need(shaped, f"optim.lr_mults must be ((regex, factor), ...), got {pairs!r}")
  patterns = [("optim.frozen", optim.get("frozen") or "")]
  if shaped:
    patterns += [(f"optim.lr_mults[{i}]", p) for i, (p, _) in enumerate(pairs)]
    for i, (_, factor) in enumerate(pairs):
      need(isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor >= 0,
           f"optim.lr_mults[{i}]: factor must be a number >= 0, got {factor!r}")
  for key, pattern in patterns:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      need(False, f"{key}: not a regular expression: {pattern!r} ({e})")


def _check_mix(c, number, need):
  from negjax import retention
  if "wise" not in c:
    return
  alphas = c.wise.alphas or ()
  need(all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1
           for a in alphas), f"wise.alphas must be numbers in [0, 1], got {tuple(alphas)!r}")
  number("wise.max_retention_loss", c.wise.max_retention_loss, high=1.0)
  try:
    mix = retention.parse_mix(c.get("export_mix", "1.0"))
  except (TypeError, ValueError) as e:
    need(False, f"export_mix {e}")
    return
  need(mix != "auto" or alphas, "export_mix=auto chooses among wise.alphas: give some "
       "(e.g. --config.wise.alphas='(0,0.25,0.5,0.75,1)') or a number for export_mix")
  need(mix != "auto" or c.eval.enabled, "export_mix=auto needs eval.enabled (it chooses "
       "by the evaluated numbers); give a number instead")


def _check_source(c, need):
  """data.source and the streams it gives against the loss weights (negjax.data.train_input)."""
  from negjax.data import train_input
  source = c.data.get("source", "records")
  if source not in train_input.SOURCES:
    need(False, f"data.source must be one of {', '.join(train_input.SOURCES)}, got {source!r}")
    return
  if source == "records":
    return
  captions, mcq = bool(c.data.get("caption_csv")), bool(c.data.get("mcq_csv"))
  if source == "official_csv":
    need(captions or mcq, "data.source=official_csv needs data.caption_csv and/or data.mcq_csv")
  elif source == "webdataset":
    need(bool(c.data.get("shards")), "data.source=webdataset needs data.shards, e.g. "
         "'DIR/{00000..00009}.tar'")
    captions = True
  else:  # converted: its splits are known once read
    need(bool(c.data.dir), "data.source=converted needs data.dir (negjax.data.convert's OUT)")
    captions = mcq = True
  for key in ("caption_csv", "mcq_csv"):
    path = c.data.get(key)
    need(not path or os.path.isfile(path), f"data.{key}: no such file: {path}")
  if source != "converted":
    need(captions or not c.loss.contrastive_weight, "loss.contrastive_weight > 0 needs "
         "captions: set data.caption_csv, or --config.loss.contrastive_weight=0")
    need(mcq or not c.loss.mcq_weight, "loss.mcq_weight > 0 needs MCQs: set data.mcq_csv, "
         "or --config.loss.mcq_weight=0")
  need(not c.eval.enabled or c.eval.data_root or c.eval.files, f"data.source={source} has "
       "no eval/ folder: set eval.data_root (NegBench CSVs) or --config.eval.enabled=False")


def as_dict(config) -> dict:
  """The config as plain JSON values (tuples become lists), as config.json holds it."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def changes(saved: dict, current: dict) -> dict:
  """{"optim.lr": (old, new)} for every key that differs, changeable keys left out."""
  old, new = _flat(saved), _flat(current)
  out = {}
  for key in sorted(set(old) | set(new)):
    if old.get(key, "<absent>") != new.get(key, "<absent>") and not _matches(key, CHANGEABLE):
      out[key] = (old.get(key, "<absent>"), new.get(key, "<absent>"))
  return out


def load(workdir: str) -> dict | None:
  """The workdir's config.json (None if it has none)."""
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def settle(workdir: str, config, resuming: bool) -> tuple[dict | None, dict]:
  """Process 0 compares `config` with config.json before a resume, refusing a change
  (`cli.UserError`, on every process) unless config.allow_config_change, then saves the new
  config.json. Returns (the saved config or None, {key: (old, new)}) on process 0."""
  saved, found, problem = None, {}, None
  if jax.process_index() == 0:
    saved = load(workdir)
    if resuming and saved is not None:  # (a workdir from before config.json: nothing to check)
      found = changes(saved, as_dict(config))
    if found and not config.get("allow_config_change", False):
      listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in found.items())
      problem = (f"{workdir} holds a run with another config ({listed}); resume with the "
                 f"same values, use another workdir, or pass --config.allow_config_change=True")
    else:
      save(workdir, config)
  if not sharding.process_0_says(problem is None):
    raise cli.UserError(problem or "process 0 refused to resume: see its error line")
  return saved, found


def same(saved: dict | None, config, keys) -> bool:
  """Whether `config` has the saved values for `keys` (names, or prefixes ending in ".")."""
  if saved is None:
    return False
  old, new = _flat(saved), _flat(as_dict(config))
  chosen = lambda d: {k: v for k, v in d.items() if _matches(k, keys)}
  return chosen(old) == chosen(new)


def save(workdir: str, config) -> None:
  """Writes WORKDIR/config.json atomically."""
  atomic.write_json(os.path.join(workdir, FILE), as_dict(config), sort_keys=True)


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _matches(key: str, names) -> bool:
  return any(key == n or (n.endswith(".") and key.startswith(n)) for n in names)
