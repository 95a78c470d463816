"""NegBench metrics as jitted kernels: MCQ accuracy and retrieval Recall@k.

All scores are dot products of L2-normalised float32 features. MCQ options use the
`(batch, options, dim)` axis order everywhere (the trainer's MCQ loss reuses `mcq_logits`).

Retrieval tie rule: the rank of a query is the number of candidates scoring *strictly*
higher than its positive (for image->text, than its best-scoring caption), so ties go in
the query's favour; Recall@k = fraction of queries with rank < k. Without ties this is
exactly the official top-k test ("is the positive among the k best?"); with ties the
official answer depends on torch.topk's arbitrary order. Ranks are counted chunk by
chunk, so the full score matrix never exists, and nothing is sorted.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from negjax.models.clip import l2_normalize

TEMPLATES = ("positive", "negative", "hybrid")
UNKNOWN = len(TEMPLATES)  # id of an option whose template type is not known
TYPE_NAMES = TEMPLATES + ("unknown",)
RECALL_KS = (1, 5, 10)
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- MCQ


@jax.jit
def mcq_logits(image_features, option_features):
  """Cosine score of each option against its own image: [B, D], [B, O, D] -> [B, O].

  Written as a multiply-and-sum (not a batched matmul of 1-row matrices), so XLA fuses
  normalisation and scoring into one pass over the option features.
  """
  image = l2_normalize(image_features)
  options = option_features.astype(jnp.float32)
  dots = (options * image[:, None, :]).sum(-1)
  norms = jnp.sqrt((options * options).sum(-1))
  return dots / jnp.maximum(norms, 1e-12)


@jax.jit
def mcq_counts(logits, answer, question_type, option_types, valid):
  """Counts for one batch of questions; sum them over batches, then `mcq_summary`.

  The chosen option is the argmax (the first one on a tie). Args: logits [B, O],
  answer [B] (index of the correct option), question_type [B] and option_types [B, O]
  (ids into TYPE_NAMES), valid [B] (False for padding). Returns int32 arrays:
  `correct` and `total` [4] per question type, `confusion` [4, 4] counting wrong answers
  by (question type, type of the chosen option).
  """
  n = len(TYPE_NAMES)
  chosen = jnp.argmax(logits, axis=-1)
  right = (chosen == answer) & valid
  wrong = (chosen != answer) & valid
  qt = jax.nn.one_hot(question_type, n, dtype=jnp.int32)
  chosen_type = jnp.take_along_axis(option_types, chosen[:, None], axis=1)[:, 0]
  ct = jax.nn.one_hot(chosen_type, n, dtype=jnp.int32)
  return {
      "correct": (qt * right[:, None]).sum(0),
      "total": (qt * valid[:, None]).sum(0),
      "confusion": jnp.einsum("bq,bc->qc", qt * wrong[:, None], ct),
  }


def mcq_summary(counts, binary=False):
  """Host-side accuracies from summed `mcq_counts`."""
  counts = jax.tree.map(np.asarray, counts)
  correct, total = counts["correct"], counts["total"]
  if binary:
    return {"accuracy": float(correct.sum() / max(total.sum(), 1)), "num_questions":
            int(total.sum())}
  out = {"total_accuracy": float(correct.sum() / max(total.sum(), 1)),
         "num_questions": int(total.sum())}
  for i, name in enumerate(TEMPLATES):
    if total[i]:
      out[f"{name}_accuracy"] = float(correct[i] / total[i])
    out[f"{name}_questions"] = int(total[i])
  out["confusion"] = {  # question type -> type of the wrong option chosen -> count
      q: {c: int(counts["confusion"][i, j]) for j, c in enumerate(TYPE_NAMES)}
      for i, q in enumerate(TYPE_NAMES) if total[i]}
  return out


# --------------------------------------------------------------------- retrieval


@jax.jit
def _scores(text, image):
  """One block of cosine scores, as a standalone dot. Inlined into a larger jitted loop,
  XLA rounded the same score differently in the two passes below; standalone dots of
  different block shapes agree bit for bit (tests/test_metrics.py checks it)."""
  return jnp.dot(text, image.T, precision=_HIGHEST)


@jax.jit
def _positives(scores, owner, start):
  return jnp.take_along_axis(scores, jnp.clip(owner - start, 0, scores.shape[1] - 1)[:, None],
                             axis=1)[:, 0]


@functools.partial(jax.jit, donate_argnums=(5,))
def _count(scores, owner, best, valid, image_valid, image_rank):
  """Both directions from one block of scores: per text, (real) images strictly above its
  own image's score (read from this very block); per image, (real) texts of other images
  strictly above its best caption (its own captions cannot be, so they are not compared:
  a rounding difference from pass 1 could otherwise count the best caption itself)."""
  positive = jnp.take_along_axis(scores, owner[:, None], axis=1)
  text_rank = ((scores > positive) & image_valid[None, :]).sum(1, dtype=jnp.int32)
  others = owner[:, None] != jnp.arange(scores.shape[1])[None, :]
  above = (scores > best[None, :]) & valid[:, None] & others
  return text_rank, image_rank + above.sum(0, dtype=jnp.int32)


def _ranks_sorted(text, image, owner, chunk):
  """Ranks for texts grouped by image (`owner` non-decreasing, every image captioned).

  Pass 1 finds each image's best caption score: the positives of a chunk of `chunk` texts lie
  among the `chunk` images starting at the chunk's first owner, so only that window is
  scored. Pass 2 scores each text chunk against all images and counts both directions.
  """
  n_text, n_image = text.shape[0], image.shape[0]
  text = jnp.pad(text, ((0, -n_text % chunk), (0, 0)))
  # Images padded to whole blocks of 64 so no score comes from a kernel's remainder path.
  image = jnp.pad(image, ((0, -n_image % 64), (0, 0)))
  image_valid = jnp.arange(image.shape[0]) < n_image
  window_images = jnp.pad(image, ((0, chunk), (0, 0)))
  owner_padded = np.pad(owner, (0, -n_text % chunk))
  positives = []
  for a in range(0, text.shape[0], chunk):
    start = int(owner_padded[a])
    window = window_images[start:start + chunk]
    positives.append(_positives(_scores(text[a:a + chunk], window),
                                jnp.asarray(owner_padded[a:a + chunk]), start))
  positive = jnp.concatenate(positives)
  valid = jnp.arange(text.shape[0]) < n_text
  owner_jax = jnp.asarray(owner_padded)
  best = jax.ops.segment_max(jnp.where(valid, positive, -jnp.inf), owner_jax,
                             num_segments=image.shape[0])
  image_rank = jnp.zeros(image.shape[0], jnp.int32)
  text_rank = []
  for a in range(0, text.shape[0], chunk):
    ranks, image_rank = _count(_scores(text[a:a + chunk], image), owner_jax[a:a + chunk], best,
                               valid[a:a + chunk], image_valid, image_rank)
    text_rank.append(ranks)
  return (np.concatenate([np.asarray(r) for r in text_rank])[:n_text],
          np.asarray(image_rank)[:n_image])


def retrieval_ranks(text_features, image_features, text_to_image, max_scores=1 << 20):
  """Exact ranks (see the module docstring) without materialising the score matrix.

  Args:
    text_features: [T, D] caption features (any scale; normalised here).
    image_features: [I, D].
    text_to_image: [T] index of each caption's image. Need not be sorted; every image
      needs at least one caption.
    max_scores: score entries held at once (sets the text chunk size).
  Returns:
    (text_rank [T], image_rank [I]) as numpy int arrays: images scoring strictly above
    each caption's image; captions scoring strictly above each image's best caption.
  """
  text_to_image = np.asarray(text_to_image, np.int32)
  n_image = image_features.shape[0]
  if text_to_image.ndim != 1 or text_to_image.shape[0] != text_features.shape[0]:
    raise ValueError("text_to_image needs one image index per caption")
  if (text_to_image.min(initial=0) < 0 or text_to_image.max(initial=0) >= n_image
      or np.any(np.bincount(text_to_image, minlength=n_image) == 0)):
    raise ValueError("every image needs at least one caption and every caption an image")
  order = np.argsort(text_to_image, kind="stable")
  chunk = max(64, min(max_scores // max(n_image, 1), 4096) // 64 * 64)
  chunk = min(chunk, -(-len(order) // 64) * 64)
  text_rank, image_rank = _ranks_sorted(
      l2_normalize(jnp.asarray(text_features)[order]), l2_normalize(jnp.asarray(image_features)),
      text_to_image[order], chunk)
  out = np.empty(len(order), np.int64)
  out[order] = np.asarray(text_rank)
  return out, np.asarray(image_rank).astype(np.int64)


def recall_at_k(text_rank, image_rank, ks=RECALL_KS):
  """Official names: image_retrieval = text->image, text_retrieval = image->text."""
  out = {}
  for k in ks:
    out[f"image_retrieval_recall@{k}"] = float(np.mean(np.asarray(text_rank) < k))
  for k in ks:
    out[f"text_retrieval_recall@{k}"] = float(np.mean(np.asarray(image_rank) < k))
  return out
