"""Metric kernels against plain NumPy versions of the official definitions."""
import jax.numpy as jnp
import numpy as np
import pytest

from negjax import metrics


def _normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _retrieval_problem(rng, n_image, max_captions, dim=16, duplicates=True):
  """Random features with a varying caption count per image, shuffled caption order and,
  optionally, exact duplicates (repeated images and repeated captions make exact ties)."""
  counts = rng.integers(1, max_captions + 1, n_image)
  owner = np.repeat(np.arange(n_image), counts)
  rng.shuffle(owner)
  image = rng.standard_normal((n_image, dim)).astype(np.float32)
  text = rng.standard_normal((len(owner), dim)).astype(np.float32)
  if duplicates:
    image[1] = image[0]
    image[3] = image[2]
    text[5:9] = text[0]
  # Scale so normalisation inside the kernel matters.
  return text * 3.0, image * 0.5, owner


def _numpy_ranks(text, image, owner):
  s = _normalise(text.astype(np.float64)) @ _normalise(image.astype(np.float64)).T
  s = s.astype(np.float32)  # the same rounding a float32 kernel ends with
  pos = s[np.arange(len(owner)), owner]
  text_rank = (s > pos[:, None]).sum(1)
  image_rank = []
  for i in range(image.shape[0]):
    best = s[owner == i, i].max()
    image_rank.append((s[:, i] > best).sum())
  return text_rank, np.array(image_rank)


def _official_recall(text, image, owner, ks=(1, 5, 10)):
  """The official approach: full score matrix, top-k then 'is a positive among them'."""
  s = _normalise(text) @ _normalise(image).T
  positive = np.zeros(s.shape, bool)
  positive[np.arange(len(owner)), owner] = True
  out = {}
  for k in ks:
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    out[f"image_retrieval_recall@{k}"] = np.take_along_axis(positive, top, 1).any(1).mean()
  for k in ks:
    top = np.argsort(-s.T, axis=1, kind="stable")[:, :k]
    out[f"text_retrieval_recall@{k}"] = np.take_along_axis(positive.T, top, 1).any(1).mean()
  return out


@pytest.mark.parametrize("max_scores", [64, 1 << 21])  # many uneven chunks, one chunk
def test_retrieval_ranks_match_numpy_with_ties(max_scores):
  rng = np.random.default_rng(0)
  text, image, owner = _retrieval_problem(rng, n_image=37, max_captions=5)
  text_rank, image_rank = metrics.retrieval_ranks(text, image, owner, max_scores=max_scores)
  want_text, want_image = _numpy_ranks(text, image, owner)
  # The problem has exact ties between a positive and a negative; they must not count.
  scores = _normalise(text) @ _normalise(image).T
  assert np.array_equal(scores[:, 0], scores[:, 1])
  np.testing.assert_array_equal(text_rank, want_text)
  np.testing.assert_array_equal(image_rank, want_image)


def test_recall_agrees_with_official_topk_without_ties():
  rng = np.random.default_rng(1)
  text, image, owner = _retrieval_problem(rng, n_image=50, max_captions=5, dim=8,
                                          duplicates=False)
  got = metrics.recall_at_k(*metrics.retrieval_ranks(text, image, owner, max_scores=200))
  want = _official_recall(text, image, owner)
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key]), key
  assert 0 < got["image_retrieval_recall@5"] < 1  # not a degenerate problem


def test_retrieval_rejects_image_without_caption():
  with pytest.raises(ValueError, match="at least one caption"):
    metrics.retrieval_ranks(np.ones((2, 4)), np.ones((3, 4)), [0, 2])


def test_mcq_logits_normalises_and_keeps_axis_order():
  rng = np.random.default_rng(2)
  image = rng.standard_normal((3, 8)).astype(np.float32)
  options = rng.standard_normal((3, 4, 8)).astype(np.float32)
  got = np.asarray(metrics.mcq_logits(image * 7, options * 0.1))
  want = np.einsum("bd,bod->bo", _normalise(image), _normalise(options))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _numpy_mcq(logits, answer, qtype, otypes):
  """Python-loop bookkeeping as in the official evaluation."""
  n = len(metrics.TYPE_NAMES)
  correct, total, confusion = np.zeros(n, int), np.zeros(n, int), np.zeros((n, n), int)
  for row, a, q, types in zip(logits, answer, qtype, otypes):
    chosen = int(np.argmax(row))
    total[q] += 1
    if chosen == a:
      correct[q] += 1
    else:
      confusion[q, types[chosen]] += 1
  return correct, total, confusion


def test_mcq_counts_over_uneven_padded_batches():
  rng = np.random.default_rng(3)
  n, o, batch = 23, 4, 8
  logits = rng.standard_normal((n, o)).astype(np.float32)
  logits[0] = 1.0  # a full tie: the first option is chosen
  answer = rng.integers(0, o, n)
  qtype = rng.integers(0, 3, n)
  otypes = rng.integers(0, 4, (n, o))
  summed = None
  for start in range(0, n, batch):
    sl = slice(start, start + batch)
    pad = batch - len(logits[sl])
    padded = [np.pad(x[sl], [(0, pad)] + [(0, 0)] * (x.ndim - 1))
              for x in (logits, answer, qtype, otypes)]
    valid = np.arange(batch) < batch - pad
    counts = metrics.mcq_counts(*[jnp.asarray(x) for x in padded], jnp.asarray(valid))
    summed = counts if summed is None else {k: summed[k] + counts[k] for k in counts}
  correct, total, confusion = _numpy_mcq(logits, answer, qtype, otypes)
  np.testing.assert_array_equal(summed["correct"], correct)
  np.testing.assert_array_equal(summed["total"], total)
  np.testing.assert_array_equal(summed["confusion"], confusion)
  summary = metrics.mcq_summary(summed)
  assert summary["num_questions"] == n
  assert summary["total_accuracy"] == pytest.approx(correct.sum() / n)
  assert summary["negative_accuracy"] == pytest.approx(correct[1] / total[1])
  assert metrics.mcq_summary(summed, binary=True)["accuracy"] == summary["total_accuracy"]


def test_retrieval_ranks_full_width_features():
  """512-d features with captions close to their images: any rounding mismatch between
  the positive's score and its own column would push it to rank 1."""
  rng = np.random.default_rng(4)
  image = _normalise(rng.standard_normal((300, 512))).astype(np.float32)
  owner = np.repeat(np.arange(300), 5)
  text = (image[owner] + 0.05 * rng.standard_normal((1500, 512))).astype(np.float32)
  text_rank, image_rank = metrics.retrieval_ranks(text, image, owner, max_scores=300 * 200)
  want_text, want_image = _numpy_ranks(text, image, owner)
  np.testing.assert_array_equal(text_rank, want_text)
  np.testing.assert_array_equal(image_rank, want_image)
