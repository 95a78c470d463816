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


def mcq_logits(image_features, option_features):
  """Cosine score of each option against its own image: [B, D], [B, O, D] -> [B, O]."""
  return jnp.einsum("bd,bod->bo", l2_normalize(image_features), l2_normalize(option_features),
                    precision=_HIGHEST)


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


def _pad_rows(x, multiple):
  pad = -x.shape[0] % multiple
  return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)), pad


@functools.partial(jax.jit, static_argnames=("chunk",))
def _retrieval_ranks(text, image, text_to_image, chunk):
  """Per-text rank (text->image) and per-image rank of its best caption (image->text).

  Texts must be grouped by image (`text_to_image` non-decreasing) and every image must
  have at least one caption; then the positives of a chunk of `chunk` texts lie in the
  `chunk` images starting at the chunk's first image, so pass 1 scores that window only.
  Pass 2 scores each text chunk against all images and counts, from the same scores,
  both directions. Both passes use the same matmul, so a positive compares bit-exactly
  with its ties.
  """
  n_text, n_image = text.shape[0], image.shape[0]
  text = l2_normalize(text)
  image = l2_normalize(image)
  text, _ = _pad_rows(text, chunk)
  owner, _ = _pad_rows(text_to_image, chunk)
  valid = jnp.arange(text.shape[0]) < n_text
  image_padded, _ = _pad_rows(image, chunk)  # so every window is in bounds
  text_chunks = text.reshape(-1, chunk, text.shape[1])
  owner_chunks = owner.reshape(-1, chunk)
  valid_chunks = valid.reshape(-1, chunk)

  # Pass 1: each text's positive score.
  def positive(args):
    t, o = args
    start = jnp.minimum(o[0], image_padded.shape[0] - chunk)
    window = jax.lax.dynamic_slice_in_dim(image_padded, start, chunk)
    s = jnp.dot(t, window.T, precision=_HIGHEST)
    return jnp.take_along_axis(s, jnp.clip(o - start, 0, chunk - 1)[:, None], axis=1)[:, 0]

  pos = jax.lax.map(positive, (text_chunks, owner_chunks))  # [chunks, chunk]
  best = jax.ops.segment_max(jnp.where(valid_chunks, pos, -jnp.inf).reshape(-1),
                             owner, num_segments=n_image)  # [images]

  # Pass 2: count candidates strictly above the positive, both directions.
  def count(image_rank, args):
    t, p, v = args
    s = jnp.dot(t, image.T, precision=_HIGHEST)  # [chunk, images]
    text_rank = (s > p[:, None]).sum(1, dtype=jnp.int32)
    image_rank = image_rank + ((s > best[None, :]) & v[:, None]).sum(0, dtype=jnp.int32)
    return image_rank, text_rank

  image_rank, text_rank = jax.lax.scan(
      count, jnp.zeros(n_image, jnp.int32), (text_chunks, pos, valid_chunks))
  return text_rank.reshape(-1)[:n_text], image_rank


def retrieval_ranks(text_features, image_features, text_to_image, max_scores=1 << 21):
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
  if np.any(np.bincount(text_to_image, minlength=n_image)[:n_image] == 0) or \
      text_to_image.min(initial=0) < 0 or text_to_image.max(initial=0) >= n_image:
    raise ValueError("every image needs at least one caption and every caption an image")
  order = np.argsort(text_to_image, kind="stable")
  chunk = int(max(8, min(max_scores // max(n_image, 1), 4096)) // 8 * 8)
  chunk = min(chunk, -(-len(order) // 8) * 8)
  text_rank, image_rank = _retrieval_ranks(
      jnp.asarray(text_features)[order], jnp.asarray(image_features),
      jnp.asarray(text_to_image[order]), chunk=chunk)
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
