"""Losses against NumPy references; the sharded step against one device."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from negjax import losses, metrics, sharding, train_step
from negjax.models import clip


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(0)
  img, txt = rng.standard_normal((2, 7, 16)).astype(np.float32)
  scale = 14.3
  logits = scale * np_normalize(img) @ np_normalize(txt).T
  want = -0.5 * (np.diag(np_log_softmax(logits)).mean() + np.diag(np_log_softmax(logits.T)).mean())
  got = losses.contrastive_loss(img, txt, scale)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_mcq_loss_matches_numpy_with_batch_options_dim_axes():
  rng = np.random.default_rng(1)
  img = rng.standard_normal((5, 16)).astype(np.float32)
  opts = rng.standard_normal((5, 4, 16)).astype(np.float32)  # (batch, options, dim)
  answer = np.array([0, 3, 1, 2, 3])
  scale = 20.0
  logits = scale * np.einsum("bd,bod->bo", np_normalize(img), np_normalize(opts))
  want = -np_log_softmax(logits)[np.arange(5), answer].mean()
  np.testing.assert_allclose(float(losses.mcq_loss(img, opts, answer, scale)), want, rtol=1e-5)


def test_loss_and_evaluator_rank_options_the_same_way():
  """The option the evaluator picks is the one the MCQ loss rewards most: same axes."""
  rng = np.random.default_rng(2)
  img = rng.standard_normal((6, 8)).astype(np.float32)
  opts = rng.standard_normal((6, 4, 8)).astype(np.float32)
  chosen = np.asarray(jnp.argmax(metrics.mcq_logits(img, opts), axis=-1))
  per_answer = [[float(losses.mcq_loss(img[i:i + 1], opts[i:i + 1], np.array([a]), 10.0))
                 for a in range(4)] for i in range(6)]
  np.testing.assert_array_equal(chosen, np.argmin(per_answer, axis=1))


def tiny_setup(batch_size=16, mcq_weight=0.5):
  config = clip.get_config("negjax-tiny")
  model = clip.create(config, seed=0)
  optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=2, end_ratio=0.1,
                                         weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6,
                                         grad_clip=1.0))
  loss_cfg = ml_collections.ConfigDict(dict(contrastive_weight=0.5, mcq_weight=mcq_weight))
  rng = np.random.default_rng(0)
  batch = {
      "image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
      "caption_ids": rng.integers(1, 400, (batch_size, 16)).astype(np.int32),
      "mcq_ids": rng.integers(1, 400, (batch_size, 4, 16)).astype(np.int32),
      "mcq_answer": rng.integers(0, 4, (batch_size,)).astype(np.int32),
  }
  batch["caption_ids"][:, -1] = 49407
  batch["mcq_ids"][:, :, -1] = 49407
  return model, optim, loss_cfg, batch


def run_steps(mesh, steps=2, **kw):
  model, optim, loss_cfg, batch = tiny_setup(**kw)
  graphdef, params = nnx.split(model, nnx.Param)
  tx, schedule = train_step.make_optimizer(optim, total_steps=10)
  state, shardings = train_step.init_state(params, tx, mesh)
  step = train_step.make_train_step(graphdef, tx, schedule, loss_cfg, mesh, shardings)
  losses_seen = []
  for _ in range(steps):
    state, m = step(state, sharding.global_batch(batch, mesh))
    losses_seen.append(float(m["loss"]))
  return state, losses_seen


@pytest.mark.parametrize("data,fsdp", [(8, 1), (1, 8), (2, 4)])
def test_sharded_step_equals_single_device(data, fsdp):
  single_state, single_losses = run_steps(sharding.make_mesh(1, 1, jax.devices()[:1]))
  state, got_losses = run_steps(sharding.make_mesh(data, fsdp))
  if fsdp > 1:  # parameters really are split
    kernel = state["params"]["visual"]["transformer"]["blocks"]["fc"]["kernel"][...]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
  np.testing.assert_allclose(got_losses, single_losses, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(single_state["params"]), jax.tree.leaves(state["params"])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)


def test_training_steps_lower_the_loss():
  _, seen = run_steps(sharding.make_mesh(), steps=6)
  assert seen[-1] < seen[0]


def test_logit_scale_is_clamped_and_no_decay_on_gains():
  model, optim, loss_cfg, batch = tiny_setup()
  graphdef, params = nnx.split(model, nnx.Param)
  params["logit_scale"].set_value(jnp.asarray(9.0))
  params = train_step.clamp_logit_scale(params)
  assert float(params["logit_scale"][...]) == pytest.approx(np.log(100.0))
  tx, _ = train_step.make_optimizer(optim, 10)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  _, opt_state = tx.update(zero_grads, tx.init(params), params)  # step 0: warmup lr is 0
  updates, _ = tx.update(zero_grads, opt_state, params)  # with zero gradients only decay acts
  assert float(jnp.abs(updates["visual"]["ln_pre"]["scale"][...]).max()) == 0.0
  assert float(jnp.abs(updates["logit_scale"][...]).max()) == 0.0
  assert float(jnp.abs(updates["visual"]["proj"][...]).max()) > 0.0


def test_text_cut_to_the_batch_longest_gives_the_same_step():
  """train_input.trim_text drops only padding after every text's EOT: same loss, same update."""
  from negjax.data import train_input
  model, optim, loss_cfg, batch = tiny_setup(batch_size=8)
  rng = np.random.default_rng(3)
  for key, longest in (("caption_ids", 11), ("mcq_ids", 6)):  # EOT at varied positions
    ids = batch[key].reshape(-1, 16)
    ends = rng.integers(1, longest, len(ids))
    ends[0] = longest - 1
    for row, end in zip(ids, ends):
      row[end], row[end + 1:] = 49407, 0
    batch[key] = ids.reshape(batch[key].shape)
  cut = train_input.trim_text(batch, multiple=4)
  assert cut["caption_ids"].shape == (8, 12) and cut["mcq_ids"].shape == (8, 4, 8)
  assert train_input.trim_text(batch, multiple=0) is batch
  graphdef, params = nnx.split(model, nnx.Param)
  tx, schedule = train_step.make_optimizer(optim, total_steps=10)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  results = []
  for b in (batch, cut):
    state, shardings = train_step.init_state(jax.tree.map(jnp.copy, params), tx, mesh)
    step = train_step.make_train_step(graphdef, tx, schedule, loss_cfg, mesh, shardings)
    for _ in range(2):
      state, m = step(state, sharding.global_batch(b, mesh))
    results.append((float(m["loss"]), state["params"]))
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
