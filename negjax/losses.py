"""Training losses: CLIP's symmetric contrastive loss and NegBench's MCQ loss.

Both score L2-normalised features scaled by the model's temperature, in float32. MCQ
options use the `(batch, options, dim)` axis order, the same as the evaluator
(`negjax.metrics.mcq_logits`), so training and evaluation rank options identically.
"""
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

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


SIGMOID_BIAS = -10.0  # the fixed logit bias of models without a learned one (SigLIP's init)


def sigmoid_loss(image_features, text_features, scale, bias=SIGMOID_BIAS):
  """SigLIP's pairwise sigmoid loss: -sum_ij log sigmoid(z_ij (scale cos_ij + bias)) / B,
  with z = +1 for pair (image i, text i) and -1 for every other pair (big_vision's siglip
  trainer). `bias`: the model's learned logit bias (SigLIP), else fixed at -10.

  Under a mesh whose batch axes split the batch, each device scores its own images against
  all texts, a [B / devices, B] block (shard_map; the texts are all-gathered), and the sums
  are added over devices: no device holds the global B x B matrix."""
  image_features, text_features = l2_normalize(image_features), l2_normalize(text_features)
  bias = jnp.asarray(bias, jnp.float32)
  mesh = jax.sharding.get_abstract_mesh()
  axes = sharding.BATCH_AXES
  n = image_features.shape[0]
  if (mesh.empty or not set(axes) <= set(mesh.axis_names)
      or sharding.batch_shards(mesh) == 1 or n % sharding.batch_shards(mesh)):
    return -_pair_loglik(image_features, text_features, scale, bias, 0) / n

  def block(img, txt, scale, bias):
    every_text = jax.lax.all_gather(txt, axes, axis=0, tiled=True)
    first = jax.lax.axis_index(axes) * img.shape[0]  # this block's first global row
    return jax.lax.psum(_pair_loglik(img, every_text, scale, bias, first), axes)

  total = jax.shard_map(block, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()),
                        out_specs=P())(image_features, text_features, scale, bias)
  return -total / n


def _pair_loglik(img, txt, scale, bias, first):
  """Sum of log sigmoid(z * logits) over rows `first`.. of the [rows, B] block."""
  logits = scale * img @ txt.T + bias
  positive = jnp.arange(img.shape[0])[:, None] + first == jnp.arange(txt.shape[0])[None, :]
  return jax.nn.log_sigmoid(jnp.where(positive, logits, -logits)).sum()


def image_text_loss(kind, image_features, text_features, scale, bias=None):
  """The image-text loss `loss.kind` names: "softmax" (CLIP's contrastive) or "sigmoid"
  (SigLIP's; `bias` None: the fixed SIGMOID_BIAS)."""
  if kind == "softmax":
    return contrastive_loss(image_features, text_features, scale)
  if kind == "sigmoid":
    return sigmoid_loss(image_features, text_features, scale,
                        SIGMOID_BIAS if bias is None else bias)
  raise ValueError(f"unknown loss kind {kind!r}; known: softmax, sigmoid")


def mcq_loss(image_features, option_features, answer, scale, normalize=True):
  """Per-image cross-entropy over its options' scores: [B, D], [B, O, D], [B] -> scalar.

  `normalize=False` scores raw (unnormalised) features times the scale, as the official
  NegBench training code's MCQ loss does (its evaluation normalises, like `normalize=True`)."""
  if normalize:
    logits = scale * mcq_logits(image_features, option_features)
  else:
    logits = scale * jnp.einsum("bd,bod->bo", image_features.astype(jnp.float32),
                                option_features.astype(jnp.float32))
  return optax.softmax_cross_entropy_with_integer_labels(logits, answer).mean()


def distill_loss(student_images, student_texts, teacher_images, teacher_texts, scale):
  """Learning without forgetting on image-caption pairs: KL(teacher || student) of the
  image->text and text->image softmax over the batch, averaged over rows and directions.

  Both models' L2-normalised features are scored at one `scale` (the teacher's
  temperature: the term matches the student's similarity structure to the teacher's, not
  its sharpness). The teacher's features should come without gradients (stop_gradient);
  float32 throughout. Zero exactly when the student's similarities equal the teacher's."""
  def log_probs(images, texts):  # each device its own rows, as contrastive_loss
    images, texts = l2_normalize(images), l2_normalize(texts)  # (float32)
    return (jax.nn.log_softmax(sharding.constrain_batch(scale * images @ texts.T), axis=1),
            jax.nn.log_softmax(sharding.constrain_batch(scale * texts @ images.T), axis=1))

  def kl(log_p, log_q):  # rows of KL(p || q)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=1)

  teacher, student = (log_probs(teacher_images, teacher_texts),
                      log_probs(student_images, student_texts))
  return 0.5 * (kl(teacher[0], student[0]).mean() + kl(teacher[1], student[1]).mean())


def feature_distance(student, teacher):
  """Mean over rows of the squared distance between L2-normalised features, in float32
  (0: same directions; 4: opposite)."""
  return jnp.sum(jnp.square(l2_normalize(student) - l2_normalize(teacher)), axis=-1).mean()
