"""Distillation from the frozen initial model (negjax.retention.distill_terms, loss.distill /
loss.distill_features): the loss terms, their gradients, the teacher's lack of them, the
retention captions of the training input, and the config checks."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from negjax import cli, losses, retention, sharding, train_step
from negjax.data import train_input
from negjax.models import clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
  model = clip.CLIP(clip.get_config("negjax-tiny"), nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
           "caption_ids": rng.integers(1, 400, (8, 8), np.int32),
           "retain_ids": rng.integers(1, 400, (8, 8), np.int32),
           "mcq_ids": rng.integers(1, 400, (8, 4, 8), np.int32),
           "mcq_answer": rng.integers(0, 4, (8,), np.int32)}
  for key in ("caption_ids", "retain_ids"):
    batch[key][:, -1] = 49407  # end of text
  batch["mcq_ids"][:, :, -1] = 49407
  return graphdef, params, batch


def _kl_numpy(t_img, t_txt, s_img, s_txt, scale):
  n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  def log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))
  t, s = scale * n(t_img) @ n(t_txt).T, scale * n(s_img) @ n(s_txt).T
  kl = lambda p, q: (np.exp(p) * (p - q)).sum(1).mean()
  return 0.5 * (kl(log_softmax(t), log_softmax(s)) + kl(log_softmax(t.T), log_softmax(s.T)))


def test_distill_loss_matches_numpy_and_is_zero_for_the_teacher():
  rng = np.random.default_rng(1)
  t_img, t_txt, s_img, s_txt = (rng.normal(size=(6, 5)).astype(np.float32) for _ in range(4))
  got = float(losses.distill_loss(s_img, s_txt, t_img, t_txt, 20.0))
  assert got == pytest.approx(_kl_numpy(t_img, t_txt, s_img, s_txt, 20.0), rel=1e-4)
  assert got > 0
  # the same directions at another length: nothing to distill
  assert float(losses.distill_loss(3 * t_img, 0.5 * t_txt, t_img, t_txt, 20.0)) == \
      pytest.approx(0.0, abs=1e-6)
  assert float(losses.feature_distance(2 * t_img, t_img)) == pytest.approx(0.0, abs=1e-6)
  assert float(losses.feature_distance(-t_img, t_img)) == pytest.approx(4.0, rel=1e-5)


def test_distill_terms_vanish_at_the_start_and_add_to_the_loss(tiny):
  graphdef, params, batch = tiny
  base, _ = train_step.loss_fn(params, graphdef, batch, 0.5, 0.5)
  same, aux = train_step.loss_fn(params, graphdef, batch, 0.5, 0.5, 0.0, params,
                                 distill=1.0, distill_features=1.0)
  assert float(aux["distill"]) == pytest.approx(0.0, abs=1e-6)
  assert float(aux["distill_features"]) == pytest.approx(0.0, abs=1e-6)
  assert float(same) == pytest.approx(float(base), rel=1e-6)
  moved = jax.tree.map(lambda p: p + 0.02 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                       params)
  base, _ = train_step.loss_fn(moved, graphdef, batch, 0.5, 0.5)
  total, aux = train_step.loss_fn(moved, graphdef, batch, 0.5, 0.5, 0.0, params,
                                  distill=2.0, distill_features=3.0)
  assert float(aux["distill"]) > 0 and float(aux["distill_features"]) > 0
  assert float(total) == pytest.approx(
      float(base) + 2.0 * float(aux["distill"]) + 3.0 * float(aux["distill_features"]),
      rel=1e-5)


def test_distill_gradient_pulls_the_student_back_and_skips_the_teacher(tiny):
  graphdef, params, batch = tiny
  moved = jax.tree.map(lambda p: p + 0.02 * jnp.cos(jnp.arange(p.size).reshape(p.shape)),
                       params)
  # the distillation terms alone (image-text and MCQ weights 0)
  loss = lambda student, teacher: train_step.loss_fn(
      student, graphdef, batch, 0.0, 0.0, 0.0, teacher, distill=1.0,
      distill_features=1.0)[0]
  g_student, g_teacher = jax.grad(loss, argnums=(0, 1))(moved, params)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_teacher))
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(g_student))
  # a small step against the gradient lowers the terms; one along it raises them
  norm = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(g_student))))
  step = lambda sign: jax.tree.map(lambda p, g: p + sign * 1e-3 / norm * g, moved, g_student)
  start = float(loss(moved, params))
  assert float(loss(step(-1.0), params)) < start < float(loss(step(+1.0), params))


def _steps(tiny, loss, initial):
  graphdef, params, batch = tiny
  optim = ml_collections.ConfigDict(dict(
      lr=1e-2, warmup_steps=0, end_ratio=1.0, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6,
      grad_clip=1.0, lr_mults=(), frozen=""))
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  tx, schedule = train_step.make_optimizer(optim, total_steps=10)
  state, shardings = train_step.init_state(jax.tree.map(jnp.array, params), tx, mesh)
  step = train_step.make_train_step(graphdef, tx, schedule, ml_collections.ConfigDict(loss),
                                    mesh, shardings, initial)
  metrics = []
  for _ in range(4):  # the schedule's first step has learning rate 0
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
  return metrics


def test_train_step_needs_the_teacher_and_logs_the_terms(tiny):
  _, params, _ = tiny
  loss = dict(contrastive_weight=0.5, mcq_weight=0.5, distill=1.0)
  with pytest.raises(ValueError, match="initial parameters"):
    _steps(tiny, loss, None)
  metrics = _steps(tiny, loss, params)
  # measured before each update: 0 at the start (and after the lr-0 step), then moved
  assert float(metrics[0]["distill"]) == pytest.approx(0.0, abs=1e-6)
  assert float(metrics[-1]["distill"]) > 0 and float(metrics[-1]["distill_features"]) > 0
  assert all(np.isfinite(float(m["loss"])) for m in metrics)


def _record():
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 256, (32, 32, 3), np.uint8),
          "negcap": ["a red circle but no square", "a red circle without a blue star",
                     "no triangle, a red circle"],
          "affirmative": ["a red circle", "a photo of a red circle"],
          "present": "red circle", "absent": "blue square;green star",
          "mcq_options": ["a", "b", "c", "d"], "mcq_answer": 1}


def test_training_rows_carry_a_retention_caption_without_changing_the_other_draws():
  from negjax.tokenizer import tokenize
  record = _record()
  plain = train_input.TrainingExample(("negcap",), 24, 32, fresh_mcq=True)
  retained = train_input.TrainingExample(("negcap",), 24, 32, fresh_mcq=True,
                                         retain_pool="affirmative")
  affirmative = {tuple(t) for t in tokenize(record["affirmative"], 24)}
  seen = set()
  for seed in range(20):
    a = plain.random_map(record, np.random.default_rng(seed))
    b = retained.random_map(record, np.random.default_rng(seed))
    assert "retain_ids" not in a and set(b) == set(a) | {"retain_ids"}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    assert tuple(b["retain_ids"]) in affirmative
    seen.add(tuple(b["retain_ids"]))
  assert len(seen) == 2  # both affirmative captions drawn
  with pytest.raises(ValueError, match="need data.source=records"):
    train_input.make_iterator(None, ml_collections.ConfigDict(dict(source="official_csv")),
                              8, 0, 32, (0, 1), retain_pool="affirmative")


def _config(**changes):
  return cli.load_config(os.path.join(ROOT, "configs", "negclip.py"), **changes)


@pytest.mark.parametrize("changes,message", [
    ({"loss.distill": -1.0}, "loss.distill must be a finite number >= 0"),
    ({"loss.distill_features": float("nan")}, "loss.distill_features must be a finite"),
    ({"loss.distill": 1.0, "data.retain_pool": "captions"}, "data.retain_pool must be one of"),
    ({"loss.distill_features": 1.0, "data.source": "official_csv", "data.caption_csv": __file__,
      "loss.mcq_weight": 0.0, "eval.enabled": False}, "need data.source=records"),
])
def test_config_refuses_bad_distill_options(changes, message):
  config = _config(**changes)
  assert any(message in p for p in retention.check_config(config))
  from negjax import train
  with pytest.raises(cli.UserError, match=message.split(" must")[0].split(" need")[0]):
    train.train(config)  # refused before any folder, data or model


def test_distill_is_off_in_the_paper_preset_and_has_no_retention_captions():
  from configs import negclip
  paper = negclip.get_config("paper")
  assert paper.loss.distill == 0.0 and paper.loss.distill_features == 0.0
  assert not retention.needs_initial(paper.loss) and not retention.distills(paper.loss)
  assert retention.check_config(paper) == []
