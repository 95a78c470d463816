"""The pure training step: loss, gradients, AdamW update, temperature clamp (CLIP's).

`make_train_step` returns one `jax.jit`-ed function of (state, batch) with explicit
shardings and the state donated, so parameters and optimizer state are updated in place.
State is a plain dict {step, params, opt_state}; params are the model's nnx.Param state.
"""
import math
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from negjax import losses, retention, sharding
from negjax.image import OPENAI_MEAN, OPENAI_STD
from negjax.models import siglip

NO_DECAY = ("bias", "scale", "class_embedding", "logit_scale",  # gains, biases, temperature
            "logit_bias")


def learning_rate_schedule(lr, warmup_steps, total_steps, end_ratio=0.0):
  return optax.warmup_cosine_decay_schedule(
      0.0, lr, max(warmup_steps, 1), max(total_steps, warmup_steps + 1), lr * end_ratio)


def make_optimizer(optim, total_steps):
  """AdamW with warmup + cosine; no weight decay on gains, biases and the temperature."""
  schedule = learning_rate_schedule(optim.lr, optim.warmup_steps, total_steps, optim.end_ratio)

  def decay_mask(params):
    def decays(path, _):  # the parameter's name is the last dict key (Variables add .value)
      name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
      return name not in NO_DECAY
    return jax.tree_util.tree_map_with_path(decays, params)

  tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                   weight_decay=optim.weight_decay, mask=decay_mask)
  if optim.get("grad_clip"):
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  lr_mults, frozen = tuple(optim.get("lr_mults") or ()), optim.get("frozen") or ""
  if lr_mults or frozen:  # frozen gradients are zeroed first: they do not count in the clip
    tx = optax.chain(scale_by_name(lambda name: 0.0 if re.fullmatch(frozen, name) else 1.0),
                     tx, scale_by_name(lambda name: lr_multiplier(name, lr_mults, frozen)))
  return tx, schedule


def lr_multiplier(name: str, lr_mults, frozen: str = "") -> float:
  """The learning-rate factor of the parameter called `name` ("visual/transformer/blocks/
  11/fc/kernel"): 0 if `frozen` matches it whole, else the factor of the first
  (regex, factor) pair of `lr_mults` that matches it whole, else 1 (big_vision's style)."""
  if frozen and re.fullmatch(frozen, name):
    return 0.0
  for pattern, factor in lr_mults:
    if re.fullmatch(pattern, name):
      return float(factor)
  return 1.0


def parameter_names(params):
  """{leaf path: [name, ...]}: one name per parameter, and one per layer for blocks stacked
  on a leading layer axis ("text/transformer/blocks/3/fc/kernel"), so that a regex can pick
  the last N blocks."""
  def names(path, leaf):
    keys = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
    if "blocks" not in keys:
      return ["/".join(keys)]
    at = keys.index("blocks") + 1
    return ["/".join(keys[:at] + [str(i)] + keys[at:]) for i in range(leaf.shape[0])]
  return jax.tree_util.tree_map_with_path(names, params)


def scale_by_name(factor_of):
  """An optax transformation multiplying each update by `factor_of(parameter name)` (per
  layer for stacked blocks); factors are fixed when the step is traced."""
  def factors(updates):
    def per_leaf(names, u):
      f = [factor_of(n) for n in names]
      if len(names) == 1 and not _is_stacked(names[0]):
        return f[0]
      return jnp.asarray(f, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
    return jax.tree.map(per_leaf, parameter_names(updates), updates,
                        is_leaf=lambda x: isinstance(x, list))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u * f, updates, factors(updates)), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _is_stacked(name):
  return "/blocks/" in name


def pixel_normalization(model) -> tuple:
  """(mean, std) of the model's own image preprocessing on x / 255: SigLIP's 0.5 / 0.5
  (`siglip.preprocess`), else CLIP's OpenAI values (`negjax.image.preprocess`)."""
  if isinstance(model, siglip.SigLIP):
    return siglip.PIXEL_MEAN, siglip.PIXEL_STD
  return OPENAI_MEAN, OPENAI_STD


def normalize_images(images_uint8, dtype=jnp.float32, mean=OPENAI_MEAN, std=OPENAI_STD):
  """uint8 NHWC in [0, 255] -> model input ((x / 255 - mean) / std; default CLIP's), on
  device."""
  x = images_uint8.astype(jnp.float32) / 255.0
  return ((x - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)


def loss_fn(params, graphdef, batch, contrastive_weight, mcq_weight, l2_init=0.0,
            initial=None, mcq_normalize=True, kind="softmax", distill=0.0,
            distill_features=0.0):
  """Weighted image-text loss (`kind`: "softmax" contrastive or "sigmoid", see
  losses.image_text_loss) + MCQ loss (+ `l2_init` times the squared distance of the
  weights to `initial`; + `distill` / `distill_features` times the distillation terms of
  the batch's `retain_ids` captions, the teacher being `initial`: see `negjax.retention`).

  A batch is one image per row (image, caption_ids, mcq_ids, mcq_answer), or two streams
  (train_input: official NegFull): caption rows (image, caption_ids) and MCQ rows of other
  images (mcq_image, mcq_ids, mcq_answer), either part alone when only one is configured.
  `mcq_normalize=False`: the official training's MCQ scores (see losses.mcq_loss)."""
  model = nnx.merge(graphdef, params)
  scale = model.temperature()
  mean, std = pixel_normalization(model)
  images = None
  contrastive = jnp.zeros((), jnp.float32)
  if "caption_ids" in batch:
    pixels = normalize_images(batch["image"], mean=mean, std=std)
    images = model.encode_image(pixels)
    caption_features = model.encode_text(batch["caption_ids"])
    bias = model.bias() if hasattr(model, "bias") else None  # SigLIP's learned logit bias
    contrastive = losses.image_text_loss(kind, images, caption_features, scale, bias)
  mcq = jnp.zeros((), jnp.float32)
  if mcq_weight > 0:  # options may be shorter than captions (see train_input.trim_text)
    mcq_images = (model.encode_image(normalize_images(batch["mcq_image"], mean=mean, std=std))
                  if "mcq_image" in batch else images)
    b, o, length = batch["mcq_ids"].shape
    option_features = model.encode_text(batch["mcq_ids"].reshape(b * o, length))
    option_features = option_features.reshape(b, o, -1)
    mcq = losses.mcq_loss(mcq_images, option_features, batch["mcq_answer"], scale,
                          mcq_normalize)
  total = contrastive_weight * contrastive + mcq_weight * mcq
  extra = {}
  if l2_init:
    extra["l2_to_init"] = retention.l2_to_init(params, initial)
    total = total + l2_init * extra["l2_to_init"]
  if distill or distill_features:
    teacher = nnx.merge(graphdef, jax.lax.stop_gradient(initial))
    extra.update(retention.distill_terms(model, teacher, images, pixels, batch["retain_ids"]))
    total = total + distill * extra["distill"] + distill_features * extra["distill_features"]
  return total, {"loss": total, "contrastive_loss": contrastive, "mcq_loss": mcq,
                 "logit_scale": scale, **extra}


def clamp_logit_scale(params):
  """exp(logit_scale) stays in [1, 100], as CLIP training does. Models with a learned logit
  bias (SigLIP) are left as they are: big_vision does not clamp, and released SigLIP
  checkpoints start above 100."""
  if "logit_bias" in params:
    return params
  params["logit_scale"].set_value(jnp.clip(params["logit_scale"][...], 0.0, math.log(100.0)))
  return params


def state_shardings(params, tx, mesh):
  """Where each part of the training state lives: parameters and optimizer state split per
  `sharding.tree_shardings`. `params` may be abstract (ShapeDtypeStructs)."""
  return {"step": sharding.replicated(mesh), "params": sharding.tree_shardings(params, mesh),
          "opt_state": sharding.tree_shardings(jax.eval_shape(tx.init, params), mesh)}


def init_state(params, tx, mesh):
  """Training state placed on `mesh` per `state_shardings`, and those shardings."""
  shardings = state_shardings(params, tx, mesh)
  params = jax.device_put(params, shardings["params"])
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  # placed as the step returns it: an uncommitted counter would compile the step twice
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
  state = {"step": step, "params": params, "opt_state": opt_state}
  return state, shardings


def make_train_step(graphdef, tx, schedule, loss_config, mesh, state_shardings,
                    initial=None):
  """The jitted step. It is traced under `mesh` (`use_abstract_mesh`), so the model's
  activation constraints (`sharding.constrain_batch`) and platform kernels see it.
  `initial`: the starting parameters, placed like the state's; needed (and only passed
  to the step) when loss_config.l2_init, distill or distill_features > 0."""
  l2_init, distill, distill_features = (retention.weight(loss_config, k)
                                         for k in ("l2_init",) + retention.DISTILL_KEYS)
  if retention.needs_initial(loss_config) and initial is None:
    raise ValueError("loss.l2_init / distill / distill_features > 0 need the initial "
                     "parameters")
  initial = initial if retention.needs_initial(loss_config) else None

  def step(state, batch, initial):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return _step(state, batch, initial)

  def _step(state, batch, initial):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state["params"], graphdef, batch,
                                  loss_config.contrastive_weight, loss_config.mcq_weight,
                                  l2_init, initial, loss_config.get("mcq_normalize", True),
                                  loss_config.get("kind", "softmax"), distill,
                                  distill_features)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = clamp_logit_scale(optax.apply_updates(state["params"], updates))
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  jitted = jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                                       None if initial is None else state_shardings["params"]),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=0)
  run = lambda state, batch: jitted(state, batch, initial)
  run.lower = lambda state, batch: jitted.lower(state, batch, initial)  # negjax.compile
  return run
