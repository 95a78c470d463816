"""NegBench metrics as jitted kernels: MCQ accuracy and retrieval Recall@k.

All scores are dot products of L2-normalised float32 features. MCQ options use the
`(batch, options, dim)` axis order everywhere (the trainer's MCQ loss reuses `mcq_logits`).

Ties. Whether a query is retrieved at k can hinge on the order of candidates with exactly
the same score: a caption repeated under two images (real caption files have them), an
image tower that maps every image to one vector, NaN weights. The official evaluation
(m1k2zoo/negbench, benchmarks/src/evaluation/retrieval.py: `evaluate_model`, `batchify`,
`recall_at_k`) computes `scores = text @ image.T` on the CPU, moves each batch of score
rows to the evaluation device (a GPU) and keeps `torch.topk(row, k)`; a query counts if
one of its positives is among those k. PyTorch's CUDA top-k
(aten/src/ATen/native/cuda/TensorTopK.cu, `sbtopk::gatherTopK`, and `mbtopk::gatherTopK`
for long rows) finds the k-th largest value by radix select, keeps every larger value,
then fills the places left with values equal to the k-th in increasing index order (a
prefix sum over the row in index order); the few-long-rows case (TensorTopK.cpp,
`should_use_sort`) takes the first k of a stable sort, the same set. Its radix key
(SortingRadixSelect.cuh, `TopKTypeConfig<float>::convert`) puts NaN above every number,
all NaNs equal, and -0.0 below +0.0. (CPU top-k is a quickselect with no tie rule.)

Hence the "official" tie rule, the default: candidates are ordered by score, then by index
(images, and captions, in the order given), and a query's rank is the number of candidates
ahead of its positive: strictly higher, or equal with a lower index. For image->text the
positive is the image's best caption (the lowest-index one among equals), as an image counts
if any of its captions is in its top k. "optimistic" counts only strictly higher candidates
(ties favour the query), "pessimistic" also every equal one. Recall@k = fraction of queries
with rank < k; `recall_at_k` also says how many queries sit on a tie at k (their outcome
depends on the rule). Ranks are exact integer counts made chunk by chunk: the full score
matrix never exists, and nothing is sorted.

MCQ: the official code takes `argmax` (the first maximum), as `mcq_counts` does; it also
counts the questions whose maximum is shared.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from negjax import cli
from negjax.models.clip import l2_normalize

TEMPLATES = ("positive", "negative", "hybrid")
UNKNOWN = len(TEMPLATES)  # id of an option whose template type is not known
TYPE_NAMES = TEMPLATES + ("unknown",)
RECALL_KS = (1, 5, 10)
TIE_RULES = ("official", "optimistic", "pessimistic")
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

  The chosen option is the argmax (the first one on a tie, NaN counting as the largest,
  as in torch). Args: logits [B, O],
  answer [B] (index of the correct option), question_type [B] and option_types [B, O]
  (ids into TYPE_NAMES), valid [B] (False for padding). Returns int32 arrays:
  `correct` and `total` [4] per question type, `confusion` [4, 4] counting wrong answers
  by (question type, type of the chosen option), `tied` (scalar): questions whose
  maximum is shared by two or more options, so the first of them was taken.
  """
  n = len(TYPE_NAMES)
  chosen = jnp.argmax(logits, axis=-1)
  top = jnp.where(jnp.isnan(logits), jnp.inf, logits)
  tied = ((top == top.max(-1, keepdims=True)).sum(-1) > 1) & valid
  right = (chosen == answer) & valid
  wrong = (chosen != answer) & valid
  qt = jax.nn.one_hot(question_type, n, dtype=jnp.int32)
  chosen_type = jnp.take_along_axis(option_types, chosen[:, None], axis=1)[:, 0]
  ct = jax.nn.one_hot(chosen_type, n, dtype=jnp.int32)
  return {
      "correct": (qt * right[:, None]).sum(0),
      "total": (qt * valid[:, None]).sum(0),
      "confusion": jnp.einsum("bq,bc->qc", qt * wrong[:, None], ct),
      "tied": tied.sum(dtype=jnp.int32),
  }


def mcq_summary(counts, binary=False):
  """Host-side accuracies from summed `mcq_counts`."""
  counts = jax.tree.map(np.asarray, counts)
  correct, total = counts["correct"], counts["total"]
  tied = int(counts["tied"])
  if binary:
    return {"accuracy": float(correct.sum() / max(total.sum(), 1)), "num_questions":
            int(total.sum()), "num_tied_questions": tied}
  out = {"total_accuracy": float(correct.sum() / max(total.sum(), 1)),
         "num_questions": int(total.sum()), "num_tied_questions": tied}
  for i, name in enumerate(TEMPLATES):
    if total[i]:
      out[f"{name}_accuracy"] = float(correct[i] / total[i])
    out[f"{name}_questions"] = int(total[i])
  out["confusion"] = {  # question type -> type of the wrong option chosen -> count
      q: {c: int(counts["confusion"][i, j]) for j, c in enumerate(TYPE_NAMES)}
      for i, q in enumerate(TYPE_NAMES) if total[i]}
  return out


# --------------------------------------------------------------------- retrieval


class Ranks(NamedTuple):
  """Per query, int64 [T] for captions (text->image) and [I] for images (image->text):
  the rank under the chosen tie rule, and how many competitors score strictly above /
  exactly equal to the positive (an image's competitors are the captions of other images)."""
  text_rank: np.ndarray
  image_rank: np.ndarray
  text_above: np.ndarray
  text_tied: np.ndarray
  image_above: np.ndarray
  image_tied: np.ndarray


def _order_key(scores):
  """int32 keys in the order of torch's CUDA top-k: NaN above every number and all NaNs
  equal, -0.0 below +0.0 (see the module docstring)."""
  bits = jax.lax.bitcast_convert_type(scores, jnp.int32)
  key = jnp.where(bits < 0, bits ^ jnp.int32(0x7fffffff), bits)
  return jnp.where(jnp.isnan(scores), jnp.iinfo(jnp.int32).max, key)


@jax.jit
def _scores(text, image):
  """One block of cosine scores, as a standalone dot. Inlined into a larger jitted loop,
  XLA rounded the same score differently in the two passes below; standalone dots of
  different block shapes agree bit for bit (tests/test_metrics.py checks it)."""
  return jnp.dot(text, image.T, precision=_HIGHEST)


@jax.jit
def _positives(scores, owner, start):
  own = jnp.clip(owner - start, 0, scores.shape[1] - 1)[:, None]
  return _order_key(jnp.take_along_axis(scores, own, axis=1)[:, 0])


def _tally(key, positive, rivals, ahead, axis):
  """Rivals along `axis` scoring above the positive, equal to it, and equal but ahead of
  it in index order."""
  above = ((key > positive) & rivals).sum(axis, dtype=jnp.int32)
  equal = (key == positive) & rivals
  return above, equal.sum(axis, dtype=jnp.int32), (equal & ahead).sum(axis, dtype=jnp.int32)


@functools.partial(jax.jit, donate_argnums=(7,))
def _count(scores, owner, caption, valid, image_valid, best, first, image_counts):
  """Both directions from one block of scores. A text's rivals are the other (real) images,
  compared with its own image's score read from this very block. An image's rivals are
  the (real) texts of other images, compared with its best caption's key from pass 1; its
  own captions are never compared (a rounding difference from pass 1 could otherwise count
  the best caption itself)."""
  key = _order_key(scores)
  image = jnp.arange(key.shape[1])[None, :]
  own = owner[:, None]
  positive = jnp.take_along_axis(key, own, axis=1)
  text_counts = _tally(key, positive, image_valid[None, :] & (image != own), image < own,
                       axis=1)
  new = _tally(key, best[None, :], valid[:, None] & (image != own),
               caption[:, None] < first[None, :], axis=0)
  return text_counts, tuple(a + b for a, b in zip(image_counts, new))


def _counts_sorted(text, image, owner, caption, chunk):
  """(above, tied, ahead) counts for texts grouped by image (`owner` non-decreasing, every
  image captioned); `caption` holds each text's index in the caller's order.

  Pass 1 finds each image's best caption (key, then lowest index): the positives of a chunk
  of `chunk` texts lie among the `chunk` images starting at the chunk's first owner, so only
  that window is scored. Pass 2 scores each text chunk against all images and counts both
  directions.
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
  caption = jnp.asarray(np.pad(caption, (0, -n_text % chunk)).astype(np.int32))
  lowest, highest = jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max
  best = jax.ops.segment_max(jnp.where(valid, positive, lowest), owner_jax,
                             num_segments=image.shape[0])
  first = jax.ops.segment_min(jnp.where(valid & (positive == best[owner_jax]), caption, highest),
                              owner_jax, num_segments=image.shape[0])
  image_counts = tuple(jnp.zeros(image.shape[0], jnp.int32) for _ in range(3))
  text_counts = []
  for a in range(0, text.shape[0], chunk):
    sl = slice(a, a + chunk)
    counts, image_counts = _count(_scores(text[sl], image), owner_jax[sl], caption[sl], valid[sl],
                                  image_valid, best, first, image_counts)
    text_counts.append(counts)
  text_counts = np.stack([np.concatenate([np.asarray(c[i]) for c in text_counts])[:n_text]
                          for i in range(3)])
  return text_counts, np.stack([np.asarray(c)[:n_image] for c in image_counts])


def _rank(above, tied, ahead, tie_rule):
  return {"official": above + ahead, "optimistic": above, "pessimistic": above + tied}[tie_rule]


def retrieval_ranks(text_features, image_features, text_to_image, tie_rule="official",
                    max_scores=1 << 20):
  """Exact ranks (see the module docstring) without materialising the score matrix.

  Args:
    text_features: [T, D] caption features (any scale; normalised here), in file order.
    image_features: [I, D], in file order.
    text_to_image: [T] index of each caption's image. Need not be sorted; every image
      needs at least one caption.
    tie_rule: one of TIE_RULES; "official" reproduces the official top-k.
    max_scores: score entries held at once (sets the text chunk size).
  Returns:
    `Ranks` of numpy int64 arrays.
  """
  if tie_rule not in TIE_RULES:
    raise cli.UserError(f"tie_rule={tie_rule!r}: choose one of {', '.join(TIE_RULES)}")
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
  sorted_counts, image = _counts_sorted(
      l2_normalize(jnp.asarray(text_features)[order]), l2_normalize(jnp.asarray(image_features)),
      text_to_image[order], order, chunk)
  text = np.empty(sorted_counts.shape, np.int64)
  text[:, order] = sorted_counts
  image = image.astype(np.int64)
  return Ranks(_rank(*text, tie_rule), _rank(*image, tie_rule), text[0], text[1], image[0],
               image[1])


def recall_at_k(ranks, ks=RECALL_KS):
  """Official names: image_retrieval = text->image, text_retrieval = image->text. The
  `_tied@k` counts are the queries whose outcome at k depends on the tie rule."""
  directions = (("image_retrieval", ranks.text_rank, ranks.text_above, ranks.text_tied),
                ("text_retrieval", ranks.image_rank, ranks.image_above, ranks.image_tied))
  out = {}
  for name, rank, _, _ in directions:
    for k in ks:
      out[f"{name}_recall@{k}"] = float(np.mean(np.asarray(rank) < k))
  for name, _, above, tied in directions:
    for k in ks:
      out[f"{name}_tied@{k}"] = int(np.sum((above < k) & (k <= above + tied)))
  return out
