"""`python -m negjax.train --config configs/negclip.py`: NegCLIP-style fine-tuning.

Reads top to bottom: config check -> workdir lock -> mesh -> data -> model and optimizer
(created sharded) -> evaluate -> resume -> train -> evaluate -> export and report. The
step itself lives in `negjax.train_step`; what a workdir holds: config.json (see
`negjax.train_config`), checkpoints/, metrics.jsonl, eval_before.json, eval_after.json,
provenance.json, report.txt, training.png, model.safetensors (SigLIP: model/, a Hugging Face
SiglipModel folder).
"""
import csv
import datetime
import glob
import json
import logging
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_flags

from negjax import atomic, checkpoint, cli, provenance, retention, sharding, train_config
from negjax import train_log
from negjax import train_step
from negjax import workdir as workdir_lock
from negjax.data import train_input
from negjax.models import clip, weights

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file")
SHAPES_CHECKPOINT = os.path.join(os.path.dirname(__file__), "assets", "shapes_clip.safetensors")
log = logging.getLogger("negjax.train")
HASH_LIMIT = 8 << 30  # provenance: data larger than this is recorded without a content hash
EVAL_INPUTS = ("model.", "data.dir", "eval.enabled", "eval.files", "eval.data_root",
               "eval.batch_size", "eval.zero_shot", "eval.zero_shot_templates")
# (what eval_before.json depends on)


def initial_checkpoint(model_config) -> str | None:
  """The file the run starts from (None: random weights)."""
  if model_config.init == "random":
    return None
  if model_config.init == "shapes":
    return SHAPES_CHECKPOINT
  if model_config.init.startswith("openai:"):
    return weights.resolve(model_config.init)  # the cached download
  return model_config.init


def model_options(model_config) -> dict:
  """The numerics options the config gives the model (also what negjax.compile builds)."""
  return dict(dtype=jnp.dtype(model_config.dtype), scan_layers=model_config.scan_layers,
              remat=model_config.remat)


def make_mesh(config, devices=None):
  """The run's (data, fsdp) mesh, checked against the global batch (negjax.compile uses it
  with compile-only devices)."""
  try:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  n_batch_shards = sharding.batch_shards(mesh)
  if config.batch_size % n_batch_shards:
    raise cli.UserError(f"batch_size {config.batch_size} must divide by the {n_batch_shards} "
                        f"batch shards (mesh {dict(mesh.shape)})")
  return mesh


def load_initial_model(model_config):
  options = model_options(model_config)
  path = initial_checkpoint(model_config)
  if path is None:
    return clip.CLIP(clip.get_config(model_config.arch, **options), nnx.Rngs(0))
  model = weights.load_model(path, arch=model_config.arch, **options)
  if getattr(model.config, "max_num_patches", 0):
    raise cli.UserError(f"{path}: fine-tuning NaFlex SigLIP 2 models is not supported: they "
                        "take patch sheets of each image at its own aspect ratio, and the "
                        "training input makes square images (fixed-resolution SigLIP / "
                        "SigLIP 2 folders train; evaluate this one with negjax.evaluate)")
  return model


def build_data_once(config):
  """The training data, built (shapes world) by process 0 before the others look: local
  processes share one cache folder, and two builds of the same world must not race."""
  if jax.process_index() == 0:
    data = train_input.prepare(config.data, config.seed)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("negjax: training data ready")
  if jax.process_index() != 0:  # finds process 0's build, or builds its own on another host
    data = train_input.prepare(config.data, config.seed)
  return data


def eval_files(eval_config, data) -> tuple[list, str]:
  root = eval_config.data_root or data.eval_root
  files = eval_config.files.split(",") if eval_config.files else list(data.eval_files)
  if not files and eval_config.data_root:  # a data.source without its own eval/ folder
    files = sorted(glob.glob(os.path.join(eval_config.data_root, "*.csv")))
  return files, root


def zero_shot_labels(config, data):
  """The zero-shot label set (negjax.zero_shot): eval.zero_shot, else the shapes world's
  objects when training on it, else None (not measured; said in the log)."""
  from negjax import zero_shot
  if not config.eval.enabled:
    return None
  templates = tuple(config.eval.get("zero_shot_templates") or ())
  if config.eval.get("zero_shot"):
    return zero_shot.read(config.eval.zero_shot, templates)
  if config.data.dir is None and not config.eval.data_root:
    return zero_shot.shapes_labels(config.data.shapes, data.eval_root, templates)
  log.warning("no zero-shot evaluation: set eval.zero_shot to a CSV of image,label rows or "
              "a folder of class folders")
  return None


def evaluate(graphdef, params, eval_config, data, zero_shot_labels=None):
  """NegBench metrics on the configured files, and zero-shot top-1 under "zero_shot" when
  labels are given ({} when evaluation is off)."""
  if not eval_config.enabled:
    return {}
  from negjax import evaluate as evaluator
  from negjax import zero_shot
  if jax.process_count() > 1:  # the evaluator encodes each process's share with local weights
    params = jax.device_put(sharding.to_host(params), jax.local_devices()[0])
  files, root = eval_files(eval_config, data)
  model = nnx.merge(graphdef, params)
  results = evaluator.evaluate_files(model, files=files, data_root=root,
                                     batch_size=eval_config.batch_size)
  if zero_shot_labels is not None:
    results["zero_shot"] = zero_shot.evaluate(model, zero_shot_labels, eval_config.batch_size)
  return results


def summary(results) -> dict:
  """Headline numbers: MCQ accuracies averaged over MCQ files, Recall@5 over retrieval
  files whose name says they are negated."""
  out = {}
  for key in ("positive_accuracy", "negative_accuracy", "hybrid_accuracy", "total_accuracy"):
    values = [m[key] for m in results.values() if isinstance(m, dict) and key in m]
    if values:
      out[key] = float(np.mean(values))
  negated = [m["image_retrieval_recall@5"] for name, m in results.items()
             if "negated" in name and isinstance(m, dict) and "image_retrieval_recall@5" in m]
  if negated:
    out["negated_retrieval_recall@5"] = float(np.mean(negated))
  for direction in ("image", "text"):  # retention: retrieval with affirmative captions
    plain = [m[f"{direction}_retrieval_recall@5"] for name, m in results.items()
             if "negated" not in name and isinstance(m, dict)
             and f"{direction}_retrieval_recall@5" in m]
    if plain:
      out[f"plain_{direction}_retrieval_recall@5"] = float(np.mean(plain))
  if isinstance(results.get("zero_shot"), dict):
    out["zero_shot_top1"] = results["zero_shot"]["zero_shot_top1"]
  return out


def main(argv):
  del argv
  try:
    train(_CONFIG.value)
  except checkpoint.WriteError as e:  # Orbax's threads may never end: exit without them
    if cli.debugging():
      traceback.print_exception(e)
    cli.fail(e, at_once=True)


def train(config):
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.CRITICAL)  # Orbax's chatter; errors reach us
  train_config.validate(config)  # before anything slow: a typo costs seconds, not a build
  if problems := retention.check_config(config):
    raise cli.UserError("config: " + "; ".join(problems))
  sharding.initialize_distributed()
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  workdir_lock.lock(workdir)  # held until the process ends
  is_main = jax.process_index() == 0

  # ------------------------------------------------------------------ mesh
  mesh = make_mesh(config)
  log.info("mesh %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(),
           jax.process_count())

  # ------------------------------------------------- config.json, resume check
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  saved_config, changed = train_config.settle(workdir, config, ckpt.latest_step() is not None)
  for key, (old, new) in changed.items():
    log.warning("config change on resume (allowed): %s %r -> %r", key, old, new)

  # ------------------------------------------------------------------ data
  data = build_data_once(config)
  model = load_initial_model(config.model)
  tokenizer = train_input.tokenizer_for(model, config.data.text_length)
  text_multiple = config.data.text_multiple if tokenizer.trims else 0
  if config.data.text_multiple and not tokenizer.trims:
    log.info("data.text_multiple=%d not used: %s texts keep their padding (the text tower "
             "reads it)", config.data.text_multiple, type(model).__name__)
  train_iter = train_input.make_iterator(
      data.train_dir, config.data, config.batch_size, config.seed,
      image_size=model.config.image_size,
      retain_pool=config.data.retain_pool if retention.distills(config.loss) else None,
      tokenizer=tokenizer)

  # ------------------------------------------------------ model + optimizer
  graphdef, params = nnx.split(model, nnx.Param)
  initial = jax.tree.map(np.array, params)  # a host copy (the state's buffers are donated)
  labels = zero_shot_labels(config, data)
  tx, schedule = train_step.make_optimizer(config.optim, config.total_steps)
  state, state_shardings = train_step.init_state(params, tx, mesh)
  architecture = weights.architecture_name(model) or "custom"
  log.info("model %s: %.1fM parameters", architecture, clip.num_params(model) / 1e6)
  del model

  # ------------------------------------------- evaluate the initial model
  before_path = os.path.join(workdir, "eval_before.json")
  reuse = sharding.process_0_says(
      os.path.exists(before_path) and train_config.same(saved_config, config, EVAL_INPUTS))
  if reuse:
    before = {}
    if is_main:  # the only reader: other hosts may not see the workdir
      with open(before_path) as f:
        before = json.load(f)
  else:
    before = evaluate(graphdef, state["params"], config.eval, data, labels)
    if is_main:
      atomic.write_json(before_path, before)

  # ------------------------------------------------------------ resume
  start, restored = ckpt.restore_latest(state, state_shardings, train_iter)
  if start is not None:
    state = restored
    log.info("resumed from step %d", start)
  start = int(start or 0)
  run_log = train_log.RunLog(workdir, config.total_steps, start, enabled=is_main)
  if changed:
    run_log.write(start, config_change={k: list(v) for k, v in changed.items()})
  if config.eval.enabled and (start == 0 or not reuse):
    run_log.write(0, eval=before)
  if is_main:
    record = provenance.record(
        checkpoint=initial_checkpoint(config.model), architecture=architecture,
        dtype=config.model.dtype, data=data_records(config.eval, data, config.data),
        config=train_config.as_dict(config), start_step=start, total_steps=config.total_steps)
    atomic.write_json(os.path.join(workdir, "provenance.json"), record)

  # ------------------------------------------------------------- train
  anchor = (jax.device_put(initial, state_shardings["params"])
            if retention.needs_initial(config.loss) else None)  # L2 anchor / teacher
  step_fn = train_step.make_train_step(graphdef, tx, schedule, config.loss, mesh,
                                       state_shardings, anchor)
  previous = None  # the previous step's metrics, read one step late so the host never waits
  t_data, t_last, since_log = 0.0, time.perf_counter(), 0
  try:  # an error ends the progress bar's line before it is printed
    for step in range(start, config.total_steps):
      t0 = time.perf_counter()
      batch = train_input.trim_text(next(train_iter), text_multiple)
      batch = sharding.global_batch(batch, mesh)
      t_data += time.perf_counter() - t0
      state, metrics = step_fn(state, batch)
      if previous is not None:
        _stop_if_not_finite(previous, step, ckpt, run_log)
      previous, done = metrics, step + 1
      since_log += 1
      run_log.advance()
      last = done == config.total_steps
      if done % config.log_every == 0 or last:
        m = jax.device_get(metrics)
        elapsed = time.perf_counter() - t_last
        # Steps run asynchronously: a step's compute shows up as wall time, not dispatch time.
        rates = {"samples_per_s": since_log * config.batch_size / elapsed,
                 "step_time": (elapsed - t_data) / since_log, "data_time": t_data / since_log}
        run_log.write(done, **m, **rates)
        run_log.console(
            f"step {done:6d} | loss {m['loss']:.4f} (contrastive {m['contrastive_loss']:.4f}, "
            f"mcq {m['mcq_loss']:.4f}) | lr {m['lr']:.2e} | scale {m['logit_scale']:.1f} | "
            f"{rates['samples_per_s']:.1f} samples/s | step {rates['step_time'] * 1e3:.0f} ms, "
            f"data {rates['data_time'] * 1e3:.0f} ms")
        t_data, t_last, since_log = 0.0, time.perf_counter(), 0
      if done % config.checkpoint_every == 0 or last:
        _stop_if_not_finite(metrics, done, ckpt, run_log, state["params"])  # never save NaNs
        ckpt.save(done, state, train_iter)
      if config.eval.every and done % config.eval.every == 0 and not last:
        run_log.write(done, eval=evaluate(graphdef, state["params"], config.eval, data,
                                          labels))
    ckpt.close()
  finally:
    run_log.close()

  # ------------------------------------------- evaluate after, export, report
  after = evaluate(graphdef, state["params"], config.eval, data, labels)
  if config.eval.enabled:
    run_log.write(config.total_steps, eval=after)
  final_params = sharding.to_host(state["params"])  # a collective: every process takes part
  alpha, mixes = choose_mix(config, graphdef, initial, final_params, before, after, data,
                            labels, run_log,
                            lambda p: jax.device_put(p, state_shardings["params"]))
  exported = after if alpha == 1.0 else mixes.get(alpha, {})
  if alpha != 1.0:
    final_params = retention.mix(initial, final_params, alpha)
  if is_main:
    atomic.write_json(os.path.join(workdir, "eval_after.json"), after)
    if mixes:
      atomic.write_json(os.path.join(workdir, "eval_mix.json"), {
          "chosen": alpha, "max_retention_loss": config.wise.max_retention_loss,
          "results": {str(a): r for a, r in mixes.items()}})
    model = nnx.merge(graphdef, final_params)
    export = config.export or os.path.join(workdir, weights.export_name(model))
    weights.save_model(model, export, config.export_dtype)
    record.update(finished=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), exported_model=provenance.file_record(export), export_mix=alpha)
    atomic.write_json(os.path.join(workdir, "provenance.json"), record)
    b = summary(before)
    sweep = {a: summary(r) for a, r in mixes.items()}
    table = report(before, after, exported if alpha != 1.0 else None, alpha)
    if sweep:
      table += ("\n\nWiSE-FT sweep: (1-alpha)*initial + alpha*fine-tuned; retention loss = "
                "largest drop of plain R@5 (both ways) and zero-shot top-1\n"
                + retention.frontier_table(b, sweep, alpha))
    print(table)
    with open(os.path.join(workdir, "report.txt"), "w") as f:
      f.write(report_header(record) + "\n\n" + table + "\n")
    print("curves and metrics:", train_log.plot_run(workdir, b, summary(after), sweep, alpha))
    print(f"fine-tuned model (mix alpha={alpha:g}):", export)
    from negjax.search import demo  # shapes demo: both models' top 5 for a negated query
    demo.after_training(config, data, initial_checkpoint(config.model), export, workdir)


def choose_mix(config, graphdef, initial, final, before, after, data, labels, run_log,
               place=lambda params: params):
  """WiSE-FT after training (negjax.retention): the mixing coefficient to export and
  {alpha: results} for each of wise.alphas (and a fixed export_mix), evaluated on the mix
  (1-alpha)*initial + alpha*final; alpha 0 is the initial model (`before`), 1 `after`.
  `place` puts host parameters where the evaluator takes them (the state's shardings)."""
  mix = retention.parse_mix(config.get("export_mix", "1.0"))
  if not config.eval.enabled:
    return 1.0 if mix == "auto" else mix, {}
  alphas = sorted({float(a) for a in (config.wise.alphas if "wise" in config else ())}
                  | ({mix} if mix != "auto" else set()))
  results = {}
  for alpha in alphas:
    if alpha == 1.0:
      results[alpha] = after
    elif alpha == 0.0:
      results[alpha] = before
    else:
      log.info("WiSE-FT: evaluating alpha=%g", alpha)
      results[alpha] = evaluate(graphdef, place(retention.mix(initial, final, alpha)),
                                config.eval, data, labels)
    run_log.write(config.total_steps, mix={"alpha": alpha, "summary": summary(results[alpha]),
                                           "results": results[alpha]})
  if mix != "auto":
    return mix, results
  chosen = retention.choose({a: summary(r) for a, r in results.items()}, summary(before),
                            config.wise.max_retention_loss)  # process 0 has every result
  chosen = alphas[int(np.argmax(sharding.process_0_says([a == chosen for a in alphas])))]
  if chosen == 0.0:
    log.warning("export_mix=auto: no mix with alpha > 0 keeps the retention loss within "
                "wise.max_retention_loss=%g; exporting alpha=0, the initial model (see the "
                "sweep table; a fixed export_mix exports another)", config.wise.max_retention_loss)
  return chosen, results


def data_records(eval_config, data, data_config=None) -> list:
  """Provenance of the training shards and the evaluation CSVs, with row counts."""
  from negjax.data import records
  if data.train_dir is None:  # data.source: CSVs, tars or converted shards (no row counts)
    paths = train_input.input_paths(data_config)
    hashed = sum(provenance.size(p) for p in paths) <= HASH_LIMIT
    out = [_file_record(p, None, "train") if hashed else
           {"path": os.path.abspath(p), "bytes": provenance.size(p), "sha256": None,
            "role": "train"} for p in paths]
  else:
    out = [_file_record(data.train_dir, len(records.training_source(data.train_dir)),
                        "train")]
  if eval_config.enabled:
    files, root = eval_files(eval_config, data)
    for file in files:
      if root and not os.path.isabs(file) and not os.path.exists(file):
        file = os.path.join(root, file)
      with open(file, newline="") as f:
        rows = sum(1 for _ in csv.reader(f)) - 1  # less the header
      out.append(_file_record(file, rows, "eval"))
  return out


def _file_record(path, rows, role) -> dict:
  if provenance.size(path) <= HASH_LIMIT:
    return dict(provenance.file_record(path, rows), role=role)
  log.warning("provenance: %s is over %d GiB, recorded without a content hash", path,
              HASH_LIMIT >> 30)
  return {"path": os.path.abspath(path), "bytes": provenance.size(path), "rows": rows,
          "sha256": None, "role": role}


def report_header(record) -> str:
  """Where the numbers below come from, in a few lines (all of it: provenance.json)."""
  def describe(r):
    if not r:
      return "random weights"
    digest = (r.get("sha256") or "not hashed")[:16]
    rows = f"{r['rows']} rows, " if "rows" in r else ""
    return f"{r['path']} ({rows}{r.get('bytes', 0) / 1e6:.1f} MB, sha256 {digest})"
  lines = [f"negjax {record['negjax_version']}, {record['date']}, {record['devices']} "
           f"{record['backend']} devices",
           f"initial model: {describe(record.get('checkpoint'))}, "
           f"{record['architecture']}, {record['dtype']}",
           f"steps: {record['start_step']} -> {record['total_steps']}"
           if record["start_step"] else f"steps: {record['total_steps']}"]
  lines += [f"{r['role']} data: {describe(r)}" for r in record["data"]]
  lines.append(f"fine-tuned model: {describe(record['exported_model'])}")
  return "\n".join(lines)


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _stop_if_not_finite(metrics, step, ckpt, run_log, params=None):
  """Ends the run, keeping the last good checkpoint, once the loss or gradient diverges
  (or, when given, the parameters)."""
  loss, grad_norm = (float(x) for x in jax.device_get((metrics["loss"], metrics["grad_norm"])))
  params_ok = params is None or bool(_all_finite(params))
  if not (np.isfinite(loss) and np.isfinite(grad_norm) and params_ok):
    ckpt.wait()
    run_log.close()
    raise cli.UserError(
        f"non-finite loss {loss} / gradient norm {grad_norm} at step {step}; stopping. The "
        f"last good checkpoint (step {ckpt.latest_step()}) is kept: lower the learning rate "
        f"or check the data, then rerun to resume from it.")


def report(before: dict, after: dict, mixed: dict | None = None, alpha: float = 1.0) -> str:
  """A before/after table: one row per (file, metric), negation and retention alike; with
  `mixed` (the exported WiSE-FT mix) a column for it, and the change is the exported
  model's."""
  rows = []
  for name in sorted(set(before) & set(after)):
    if not isinstance(before[name], dict):
      continue
    for key in sorted(before[name]):
      b, a = before[name].get(key), after[name].get(key)
      m = (mixed or {}).get(name, {}).get(key) if mixed is not None else a
      if all(isinstance(x, (int, float)) for x in (b, a, m)) and (
          "accuracy" in key or "recall" in key or "top1" in key):
        rows.append((name, key, b, a, m))
  width = max([len(r[0]) for r in rows] + [4])
  mix_column = f"{'a=' + format(alpha, 'g'):>7s} " if mixed is not None else ""
  lines = [f"{'file':{width}s}  {'metric':30s} {'before':>7s} {'after':>7s} {mix_column}"
           f"{'change':>7s}"]
  for name, key, b, a, m in rows:
    mix_value = f"{m:7.3f} " if mixed is not None else ""
    lines.append(f"{name:{width}s}  {key:30s} {b:7.3f} {a:7.3f} {mix_value}{m - b:+7.3f}")
  return "\n".join(lines)


if __name__ == "__main__":
  cli.run(main)
