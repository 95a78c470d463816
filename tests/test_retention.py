"""Retention levers (negjax.retention): WiSE-FT mixing and its automatic choice, per-
parameter learning rates / freezing by name, the L2-to-init penalty, their config checks,
and the trainer's sweep + export end to end on a tiny shapes world."""
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from negjax import cli, retention, sharding, train_config, train_step
from negjax.data import make
from negjax.models import clip, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mix_is_the_weighted_mean_and_keeps_the_ends():
  initial = {"a": np.array([0.0, 2.0], np.float32), "b": np.array(4.0, np.float32)}
  tuned = {"a": np.array([4.0, -2.0], np.float32), "b": np.array(0.0, np.float32)}
  mixed = retention.mix(initial, tuned, 0.25)
  np.testing.assert_allclose(mixed["a"], [1.0, 1.0])
  np.testing.assert_allclose(mixed["b"], 3.0)
  np.testing.assert_array_equal(retention.mix(initial, tuned, 0.0)["a"], initial["a"])
  np.testing.assert_array_equal(retention.mix(initial, tuned, 1.0)["a"], tuned["a"])
  with pytest.raises(ValueError):
    retention.mix(initial, tuned, 1.5)


def _summary(neg, retained):
  return {"negative_accuracy": neg, "negated_retrieval_recall@5": neg,
          "plain_image_retrieval_recall@5": retained, "plain_text_retrieval_recall@5": retained,
          "zero_shot_top1": retained}


def test_auto_choice_takes_best_negation_within_the_retention_bound():
  before = _summary(0.0, 0.80)
  sweep = {0.0: before, 0.25: _summary(0.30, 0.80), 0.5: _summary(0.40, 0.785),
           0.75: _summary(0.45, 0.75), 1.0: _summary(0.50, 0.60)}
  assert retention.retention_loss(before, sweep[0.75]) == pytest.approx(0.05)
  assert retention.choose(sweep, before, 0.02) == 0.5
  assert retention.choose(sweep, before, 0.06) == 0.75
  assert retention.choose(sweep, before, 1.0) == 1.0
  # one retention number dropping is enough to exclude a mix
  sweep[0.5] = dict(sweep[0.5], zero_shot_top1=0.70)
  assert retention.choose(sweep, before, 0.02) == 0.25
  # equal negation: the smaller alpha (closer to the initial model)
  sweep[0.25] = dict(sweep[0.25], negative_accuracy=0.0, **{"negated_retrieval_recall@5": 0.0})
  assert retention.choose(sweep, before, 0.02) == 0.0


def test_parse_mix():
  assert retention.parse_mix("auto") == "auto"
  assert retention.parse_mix("0.5") == 0.5
  for bad in ("1.5", "-0.1", "best"):
    with pytest.raises(ValueError):
      retention.parse_mix(bad)


@pytest.fixture(scope="module")
def tiny():
  model = clip.CLIP(clip.get_config("negjax-tiny"), nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
           "caption_ids": rng.integers(1, 400, (8, 8), np.int32),
           "mcq_ids": rng.integers(1, 400, (8, 4, 8), np.int32),
           "mcq_answer": rng.integers(0, 4, (8,), np.int32)}
  batch["caption_ids"][:, -1] = batch["mcq_ids"][:, :, -1] = 49407  # end of text
  return graphdef, params, batch


def _two_steps(tiny, loss=None, initial=None, **optim):
  graphdef, params, batch = tiny
  config = ml_collections.ConfigDict(dict(
      lr=1e-2, warmup_steps=0, end_ratio=1.0, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6,
      grad_clip=1.0, lr_mults=(), frozen=""))
  config.update(optim)
  loss = ml_collections.ConfigDict(loss or dict(contrastive_weight=0.5, mcq_weight=0.5))
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  tx, schedule = train_step.make_optimizer(config, total_steps=10)
  state, shardings = train_step.init_state(jax.tree.map(jnp.array, params), tx, mesh)
  step = train_step.make_train_step(graphdef, tx, schedule, loss, mesh, shardings, initial)
  for _ in range(2):  # the schedule's first step has learning rate 0
    state, metrics = step(state, batch)
  return jax.device_get(state["params"]), jax.device_get(metrics)


def _moved(before, after):
  return {"/".join(str(k.key) for k in path if hasattr(k, "key")): not np.array_equal(a, b)
          for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                                  jax.tree.leaves(after))}


def test_frozen_regex_and_lr_mults_by_name_and_stacked_layer(tiny):
  # The schedule's first step has learning rate 0, so both runs take their second step
  # from the same weights with the same gradients: updates differ only by the factors.
  _, params, _ = tiny
  host = jax.device_get(params)
  full, _ = _two_steps(tiny, weight_decay=0.0, grad_clip=0.0)
  picked, _ = _two_steps(tiny, weight_decay=0.0, grad_clip=0.0, frozen="visual/(?!proj$).*",
                         lr_mults=(("text/transformer/blocks/1/.*", 0.0),
                                   ("visual/proj", 0.1)))
  moved = _moved(host, picked)
  assert not any(v for k, v in moved.items() if k.startswith("visual/") and k != "visual/proj")
  assert moved["visual/proj"] and moved["text/token_embedding"]
  value = lambda p, *keys: np.asarray(functools.reduce(lambda d, k: d[k], keys, p)[...])
  np.testing.assert_allclose(value(picked, "visual", "proj") - value(host, "visual", "proj"),
                             0.1 * (value(full, "visual", "proj") - value(host, "visual", "proj")),
                             rtol=1e-4, atol=1e-7)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  close(value(picked, "text", "token_embedding"), value(full, "text", "token_embedding"))
  fc = ("text", "transformer", "blocks", "fc", "kernel")
  assert np.array_equal(value(picked, *fc)[1], value(host, *fc)[1])  # layer 1: factor 0
  close(value(picked, *fc)[0], value(full, *fc)[0])  # layer 0: factor 1
  assert not np.array_equal(value(full, *fc)[1], value(host, *fc)[1])
  assert train_step.lr_multiplier("visual/proj", (("visual/.*", 0.1), (".*", 0.5))) == 0.1
  assert train_step.lr_multiplier("text/proj", (("visual/.*", 0.1), (".*", 0.5))) == 0.5
  assert train_step.lr_multiplier("visual/proj", (), frozen="visual/.*") == 0.0


def test_l2_to_init_penalty_is_added_and_pulls_back(tiny):
  graphdef, params, batch = tiny
  moved = jax.tree.map(lambda p: p + 0.01, params)
  base, _ = train_step.loss_fn(moved, graphdef, batch, 0.5, 0.5)
  with_l2, aux = train_step.loss_fn(moved, graphdef, batch, 0.5, 0.5, 2.0, params)
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) - 1  # not logit_scale
  assert float(aux["l2_to_init"]) == pytest.approx(n * 1e-4, rel=1e-3)
  assert float(with_l2) == pytest.approx(float(base) + 2.0 * n * 1e-4, rel=1e-4)
  with pytest.raises(ValueError, match="initial parameters"):
    _two_steps(tiny, loss=dict(contrastive_weight=0.5, mcq_weight=0.5, l2_init=1.0))
  _, metrics = _two_steps(tiny, loss=dict(contrastive_weight=0.5, mcq_weight=0.5,
                                         l2_init=1.0), initial=params)
  # measured before each update; the first step's learning rate is 0: still at the start
  assert float(metrics["l2_to_init"]) == 0.0 and np.isfinite(float(metrics["loss"]))


def _config(**changes):
  return cli.load_config(os.path.join(ROOT, "configs", "negclip.py"), **changes)


@pytest.mark.parametrize("key,value,message", [
    ("optim.frozen", "visual/(", "optim.frozen: not a regular expression"),
    ("optim.lr_mults", (("visual/.*", -1.0),), "factor must be a number >= 0"),
    ("optim.lr_mults", ("visual",), "optim.lr_mults must be ((regex, factor), ...)"),
    ("export_mix", "2", "export_mix must be 'auto' or a number in [0, 1]"),
    ("wise.alphas", (0.5, 1.5), "wise.alphas must be numbers in [0, 1]"),
    ("loss.l2_init", -1.0, "loss.l2_init must be a finite number"),
])
def test_config_refuses_bad_retention_options(key, value, message):
  with pytest.raises(cli.UserError, match=message.replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[").replace("]", r"\]")):
    train_config.validate(_config(**{key: value}))


def test_paper_preset_keeps_the_released_recipe():
  from configs import negclip
  c = negclip.get_config("paper")
  assert c.optim.lr == 1e-8 and (c.loss.contrastive_weight, c.loss.mcq_weight) == (0.99, 0.01)
  assert tuple(c.wise.alphas) == () and retention.parse_mix(c.export_mix) == 1.0
  assert c.loss.l2_init == 0.0 and not c.optim.lr_mults and not c.optim.frozen


def test_trainer_sweeps_alphas_and_exports_the_chosen_mix(tmp_path):
  from negjax import train, zero_shot
  data = str(tmp_path / "shapes")
  world = make.default_config("shapes", out=data, train_size=32, eval_size=16, image_size=32,
                              shards=1, workers=1, progress=False)
  make.build(world)
  labels = zero_shot.shapes_labels(world, os.path.join(data, "eval"))
  with open(tmp_path / "zero_shot.csv", "w") as f:
    f.write("image,label\n" + "".join(f"{p},{labels.classes[c]}\n"
                                      for p, ls in zip(labels.paths, labels.labels) for c in ls))
  workdir = str(tmp_path / "run")
  config = _config(workdir=workdir, **{
      "data.dir": data, "model.init": "random", "model.arch": "negjax-tiny",
      "total_steps": 4, "batch_size": 8, "log_every": 2, "checkpoint_every": 4,
      "data.text_length": 16, "optim.lr": 1e-3, "eval.zero_shot": str(tmp_path / "zero_shot.csv"),
      "wise.alphas": (0.0, 0.5, 1.0), "wise.max_retention_loss": 1.0, "export_mix": "0.5"})
  train.train(config)
  mixes = json.load(open(os.path.join(workdir, "eval_mix.json")))
  assert sorted(mixes["results"]) == ["0.0", "0.5", "1.0"] and mixes["chosen"] == 0.5
  before = json.load(open(os.path.join(workdir, "eval_before.json")))
  after = json.load(open(os.path.join(workdir, "eval_after.json")))
  assert mixes["results"]["0.0"] == before and mixes["results"]["1.0"] == after
  assert 0 <= before["zero_shot"]["zero_shot_top1"] <= 1
  assert before["zero_shot"]["num_images"] == 16
  report = open(os.path.join(workdir, "report.txt")).read()
  assert "WiSE-FT sweep" in report and "zero_shot_top1" in report and "a=0.5" in report
  logged = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert sorted(r["mix"]["alpha"] for r in logged if "mix" in r) == [0.0, 0.5, 1.0]

  # the fine-tuned weights: a copy of the run resumed at its last step in another process
  # (this process holds the run's workdir lock until it ends)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  tuned = str(tmp_path / "tuned.safetensors")
  result = subprocess.run(
      [sys.executable, "-m", "negjax.train", "--config", "configs/negclip.py",
       f"--config.workdir={resumed}", f"--config.data.dir={data}", "--config.model.init=random",
       "--config.model.arch=negjax-tiny", "--config.total_steps=4", "--config.batch_size=8",
       "--config.data.text_length=16", "--config.optim.lr=0.001", "--config.log_every=2",
       "--config.checkpoint_every=4", "--config.eval.enabled=False", "--config.wise.alphas=()",
       "--config.export_mix=1.0", f"--config.export={tuned}",
       "--config.allow_config_change=True"],
      cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  start = str(tmp_path / "start.safetensors")
  weights.save_open_clip(clip.CLIP(clip.get_config("negjax-tiny"), nnx.Rngs(0)), start,
                         "float32")
  start, tuned = load_file(start), load_file(tuned)
  half = load_file(os.path.join(workdir, "model.safetensors"))
  assert any(not np.array_equal(start[k], tuned[k]) for k in start)
  for name in start:
    np.testing.assert_allclose(half[name], 0.5 * start[name] + 0.5 * tuned[name],
                               rtol=1e-5, atol=1e-6)
