"""`python -m negjax.train --config configs/negclip.py`: NegCLIP-style fine-tuning.

Reads top to bottom: mesh -> data -> model and optimizer (created sharded) -> resume ->
evaluate -> train -> evaluate -> report. The step itself lives in `negjax.train_step`.
"""
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx
from ml_collections import config_flags

from negjax import checkpoint, sharding, train_log, train_step
from negjax.data import train_input
from negjax.models import checkpoints, clip

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file")
SHAPES_CHECKPOINT = os.path.join(os.path.dirname(__file__), "assets", "shapes_clip.safetensors")
log = logging.getLogger("negjax.train")


def load_initial_model(model_config):
  options = dict(dtype=jnp.dtype(model_config.dtype), scan_layers=model_config.scan_layers,
                 remat=model_config.remat)
  if model_config.init == "random":
    return clip.CLIP(clip.get_config(model_config.arch, **options), nnx.Rngs(0))
  path = SHAPES_CHECKPOINT if model_config.init == "shapes" else model_config.init
  return checkpoints.load_model(path, arch=model_config.arch, **options)


def evaluate(graphdef, params, eval_config, data, step, run_log):
  """NegBench metrics on the configured files; logged with the step."""
  if not eval_config.enabled:
    return {}
  from negjax import evaluate as evaluator
  if jax.process_count() > 1:  # the evaluator encodes each process's share with local weights
    params = jax.device_put(sharding.to_host(params), jax.local_devices()[0])
  model = nnx.merge(graphdef, params)
  results = evaluator.evaluate_files(
      model, files=eval_config.files.split(",") if eval_config.files else data.eval_files,
      data_root=eval_config.data_root or data.eval_root, batch_size=eval_config.batch_size)
  run_log.write(step, eval=results)
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
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
  sharding.initialize_distributed()
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  # ------------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % n_batch_shards:
    sys.exit(f"batch_size {config.batch_size} must divide by the {n_batch_shards} batch shards")
  log.info("mesh %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(),
           jax.process_count())

  # ------------------------------------------------------------------ data
  data = train_input.prepare(config.data, config.seed)
  model = load_initial_model(config.model)
  train_iter = train_input.make_iterator(
      data.train_dir, config.data, config.batch_size, config.seed,
      image_size=model.config.image_size)

  # ------------------------------------------------------ model + optimizer
  graphdef, params = nnx.split(model, nnx.Param)
  tx, schedule = train_step.make_optimizer(config.optim, config.total_steps)
  state, state_shardings = train_step.init_state(params, tx, mesh)
  log.info("model %s: %.1fM parameters", clip.architecture_name(model.config) or "custom",
           clip.num_params(model) / 1e6)
  del model

  # ------------------------------------------------------------ resume
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, state, state_shardings, train_iter)
    log.info("resumed from step %d", start)
  start = int(start or 0)
  run_log = train_log.RunLog(workdir, config.total_steps, start, enabled=is_main)

  # ------------------------------------------------------- evaluate before
  before_path = os.path.join(workdir, "eval_before.json")
  if os.path.exists(before_path):
    with open(before_path) as f:
      before = json.load(f)
  else:
    before = evaluate(graphdef, state["params"], config.eval, data, start, run_log)
    if is_main:
      with open(before_path, "w") as f:
        json.dump(before, f, indent=1)

  # ------------------------------------------------------------- train
  step_fn = train_step.make_train_step(graphdef, tx, schedule, config.loss, mesh,
                                       state_shardings)
  previous = None  # the previous step's metrics, read one step late so the host never waits
  t_data, t_last, since_log = 0.0, time.perf_counter(), 0
  for step in range(start, config.total_steps):
    t0 = time.perf_counter()
    batch = train_input.trim_text(next(train_iter), config.data.text_multiple)
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
      evaluate(graphdef, state["params"], config.eval, data, done, run_log)
  ckpt.close()
  run_log.close()

  # --------------------------------------------------- evaluate after + report
  after = evaluate(graphdef, state["params"], config.eval, data, config.total_steps, run_log)
  final_params = sharding.to_host(state["params"])  # a collective: every process takes part
  if is_main:
    with open(os.path.join(workdir, "eval_after.json"), "w") as f:
      json.dump(after, f, indent=1)
    table = report(before, after)
    print(table)
    with open(os.path.join(workdir, "report.txt"), "w") as f:
      f.write(table + "\n")
    b, a = summary(before), summary(after)
    print("curves and metrics:", train_log.plot_run(workdir, b, a, sorted(set(b) | set(a))))
    export = config.export or os.path.join(workdir, "model.safetensors")
    checkpoints.save_open_clip(nnx.merge(graphdef, final_params), export, config.export_dtype)
    print("fine-tuned model:", export)


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
    sys.exit(f"error: non-finite loss {loss} / gradient norm {grad_norm} at step {step}; "
             f"stopping. The last good checkpoint (step {ckpt.latest_step()}) is kept: lower "
             f"the learning rate or check the data, then rerun to resume from it.")


def report(before: dict, after: dict) -> str:
  """A before/after table: one row per (file, metric)."""
  rows = []
  for name in sorted(set(before) & set(after)):
    if not isinstance(before[name], dict):
      continue
    for key in sorted(before[name]):
      b, a = before[name].get(key), after[name].get(key)
      if isinstance(b, (int, float)) and isinstance(a, (int, float)) and (
          "accuracy" in key or "recall" in key):
        rows.append((name, key, b, a))
  width = max([len(r[0]) for r in rows] + [4])
  lines = [f"{'file':{width}s}  {'metric':28s} {'before':>7s} {'after':>7s} {'change':>7s}"]
  for name, key, b, a in rows:
    lines.append(f"{name:{width}s}  {key:28s} {b:7.3f} {a:7.3f} {a - b:+7.3f}")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
