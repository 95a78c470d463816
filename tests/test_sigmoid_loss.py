"""SigLIP's sigmoid loss: against NumPy, sharded over 8 devices equal to one device without a
global [B, B] buffer, selectable in the train step for CLIP (fixed bias) and SigLIP (learned
bias), and refused by name in the config check."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from negjax import losses, sharding, train_step
from negjax.models import clip, siglip

B, D = 64, 24  # global batch, feature width: an 8-device mesh gives [8, 64] blocks


def numpy_sigmoid_loss(img, txt, scale, bias):
  img = img / np.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  logits = (scale * img @ txt.T + bias).astype(np.float64)
  z = 2 * np.eye(len(img)) - 1
  return np.sum(np.log1p(np.exp(-z * logits))) / len(img)


def features(seed=0):
  rng = np.random.default_rng(seed)
  img, txt = rng.standard_normal((2, B, D)).astype(np.float32)
  txt[:16] = img[:16] + 0.3 * txt[:16]  # some positive pairs score high
  return img, txt


def test_sigmoid_loss_matches_numpy():
  img, txt = features()
  np.testing.assert_allclose(float(losses.sigmoid_loss(img, txt, 10.0, -3.0)),
                             numpy_sigmoid_loss(img, txt, 10.0, -3.0), rtol=1e-5)
  # no learned bias: SigLIP's -10
  np.testing.assert_allclose(float(losses.image_text_loss("sigmoid", img, txt, 10.0)),
                             numpy_sigmoid_loss(img, txt, 10.0, -10.0), rtol=1e-5)


def loss_and_grads(mesh, fn):
  """jit(value_and_grad(fn)) traced under `mesh`, on features split over its batch axes."""
  def under_mesh(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  split, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  f = jax.jit(jax.value_and_grad(under_mesh, argnums=(0, 1, 2, 3)),
              in_shardings=(split, split, whole, whole))
  img, txt = features()
  args = (jax.device_put(img, split), jax.device_put(txt, split), jnp.float32(10.0),
          jnp.float32(-3.0))
  return f(*args), f.lower(*args).compile().as_text()


@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_sharded_sigmoid_loss_equals_one_device_without_a_global_matrix(data, fsdp):
  (value, grads), hlo = loss_and_grads(sharding.make_mesh(data, fsdp), losses.sigmoid_loss)
  (want, want_grads), one_hlo = loss_and_grads(sharding.make_mesh(1, 1, jax.devices()[:1]),
                                               losses.sigmoid_loss)
  np.testing.assert_allclose(float(value), float(want), rtol=1e-6)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-6)
  assert f"f32[{B},{B}]" in one_hlo  # the check sees a global matrix where there is one
  assert f"f32[{B},{B}]" not in hlo and f"f32[{B // 8},{B}]" in hlo


def tiny_batch(length, vocab, n=8):
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
          "caption_ids": rng.integers(1, vocab, (n, length)).astype(np.int32)}


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_train_step_loss_kind_selects_the_loss(family):
  if family == "clip":
    model, batch = clip.create(clip.get_config("negjax-tiny")), tiny_batch(16, 400)
  else:
    model, batch = siglip.create(siglip.ARCHITECTURES["siglip-tiny"]), tiny_batch(16, 256)
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def run(params, batch):
    model = nnx.merge(graphdef, params)
    mean, std = train_step.pixel_normalization(model)  # the model's own (SigLIP: 0.5 / 0.5)
    images = model.encode_image(train_step.normalize_images(batch["image"], mean=mean, std=std))
    texts = model.encode_text(batch["caption_ids"])
    bias = model.bias() if family == "siglip" else losses.SIGMOID_BIAS
    softmax = train_step.loss_fn(params, graphdef, batch, 1.0, 0.0, kind="softmax")[1]
    (_, sigmoid), grads = jax.value_and_grad(train_step.loss_fn, has_aux=True)(
        params, graphdef, batch, 1.0, 0.0, kind="sigmoid")
    got = {"softmax": softmax, "sigmoid": sigmoid}
    return images, texts, model.temperature(), bias, got, grads.get("logit_bias")

  images, texts, scale, bias, got, bias_grad = run(params, batch)
  np.testing.assert_allclose(float(got["softmax"]["contrastive_loss"]),
                             float(losses.contrastive_loss(images, texts, scale)), rtol=1e-5)
  np.testing.assert_allclose(float(got["sigmoid"]["contrastive_loss"]),
                             numpy_sigmoid_loss(np.asarray(images), np.asarray(texts),
                                                float(scale), float(bias)), rtol=1e-5)
  if family == "siglip":  # the learned bias is trained
    assert float(jnp.abs(bias_grad[...])) > 0


def test_config_refuses_an_unknown_loss_kind():
  from configs import negclip
  from negjax import cli, train_config
  c = negclip.get_config()
  c.loss.kind = "hinge"
  with pytest.raises(cli.UserError, match="loss.kind must be 'softmax'.*or 'sigmoid'"):
    train_config.validate(c)
  c.loss.kind = "sigmoid"
  train_config.validate(c)
