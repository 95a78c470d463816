"""Training losses: CLIP's symmetric contrastive loss and NegBench's MCQ loss.

Both score L2-normalised features scaled by the model's temperature, in float32. MCQ
options use the `(batch, options, dim)` axis order, the same as the evaluator
(`negjax.metrics.mcq_logits`), so training and evaluation rank options identically.
"""
import jax.numpy as jnp
import optax

from negjax import sharding
from negjax.metrics import mcq_logits
from negjax.models.clip import l2_normalize


def contrastive_loss(image_features, text_features, scale):
  """Mean of image->text and text->image cross-entropy; pair i is (image i, text i).

  Under a mesh each device scores only its own rows, [B / devices, B] for each direction
  (two matmuls instead of one and a transpose): the global B x B logits would be 4 GiB in
  float32 on one device at B = 32k."""
  image_features, text_features = l2_normalize(image_features), l2_normalize(text_features)
  logits = sharding.constrain_batch(scale * image_features @ text_features.T)
  logits_t = sharding.constrain_batch(scale * text_features @ image_features.T)
  labels = jnp.arange(logits.shape[0])
  per_image = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  per_text = optax.softmax_cross_entropy_with_integer_labels(logits_t, labels)
  return 0.5 * (per_image.mean() + per_text.mean())


def mcq_loss(image_features, option_features, answer, scale):
  """Per-image cross-entropy over its options' scores: [B, D], [B, O, D], [B] -> scalar."""
  logits = scale * mcq_logits(image_features, option_features)
  return optax.softmax_cross_entropy_with_integer_labels(logits, answer).mean()
