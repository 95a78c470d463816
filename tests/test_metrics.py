"""Metric kernels against plain NumPy versions of the official definitions."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from negjax import cli, metrics


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


def _numpy_counts(s, owner):
  """(above, tied, ahead) per caption [3, T] and per image [3, I], straight from the
  definitions on a float32 score matrix; NaN is the largest score, as in torch's top-k."""
  s = np.where(np.isnan(s), np.inf, s)
  n_text, n_image = s.shape
  text, image = np.zeros((3, n_text), int), np.zeros((3, n_image), int)
  for t in range(n_text):
    row, pos = s[t], s[t, owner[t]]
    rivals = np.arange(n_image) != owner[t]
    equal = (row == pos) & rivals
    text[:, t] = ((row > pos) & rivals).sum(), equal.sum(), (equal[:owner[t]]).sum()
  for i in range(n_image):
    own = np.flatnonzero(owner == i)
    col, best = s[:, i], s[own, i].max()
    first = own[s[own, i] == best].min()
    equal = (col == best) & (owner != i)
    image[:, i] = ((col > best) & (owner != i)).sum(), equal.sum(), equal[:first].sum()
  return text, image


def _rule(counts, tie_rule):
  above, tied, ahead = counts
  return {"official": above + ahead, "optimistic": above, "pessimistic": above + tied}[tie_rule]


def _check_ranks(got, scores, owner, tie_rule):
  text, image = _numpy_counts(scores, owner)
  np.testing.assert_array_equal(got.text_above, text[0])
  np.testing.assert_array_equal(got.text_tied, text[1])
  np.testing.assert_array_equal(got.image_above, image[0])
  np.testing.assert_array_equal(got.image_tied, image[1])
  np.testing.assert_array_equal(got.text_rank, _rule(text, tie_rule))
  np.testing.assert_array_equal(got.image_rank, _rule(image, tie_rule))


def _rounded_scores(text, image):
  s = _normalise(text.astype(np.float64)) @ _normalise(image.astype(np.float64)).T
  return s.astype(np.float32)  # the same rounding a float32 kernel ends with


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


@pytest.mark.parametrize("tie_rule", metrics.TIE_RULES)
@pytest.mark.parametrize("max_scores", [64, 1 << 21])  # many uneven chunks, one chunk
def test_retrieval_ranks_match_numpy_with_ties(max_scores, tie_rule):
  rng = np.random.default_rng(0)
  text, image, owner = _retrieval_problem(rng, n_image=37, max_captions=5)
  got = metrics.retrieval_ranks(text, image, owner, tie_rule, max_scores=max_scores)
  scores = _rounded_scores(text, image)
  assert np.array_equal(scores[:, 0], scores[:, 1])  # exact ties between images
  _check_ranks(got, scores, owner, tie_rule)
  assert got.text_tied.sum() > 0


def test_recall_agrees_with_official_topk_without_ties():
  rng = np.random.default_rng(1)
  text, image, owner = _retrieval_problem(rng, n_image=50, max_captions=5, dim=8,
                                          duplicates=False)
  got = metrics.recall_at_k(metrics.retrieval_ranks(text, image, owner, max_scores=200))
  want = _official_recall(text, image, owner)
  assert {k for k in got if "recall" in k} == want.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key]), key
  assert all(got[f"{d}_tied@{k}"] == 0 for d in ("image_retrieval", "text_retrieval")
             for k in metrics.RECALL_KS)
  assert 0 < got["image_retrieval_recall@5"] < 1  # not a degenerate problem


# ----------------------------------------------------- exact ties against torch's top-k


def _exact_tie_problem(rng, n_image, max_captions, dim=32):
  """Unit vectors of +-0.25 in half the dimensions: every score is a multiple of 1/16,
  computed exactly in any summation order, so many exact ties and no rounding doubt.
  Repeated images and captions under different images add ties of every kind."""
  def vectors(n):
    x = np.zeros((n, dim), np.float32)
    for row in x:
      row[rng.choice(dim, dim // 2, replace=False)] = rng.choice([-0.25, 0.25], dim // 2)
    return x
  counts = rng.integers(1, max_captions + 1, n_image)
  owner = np.repeat(np.arange(n_image), counts)
  rng.shuffle(owner)
  image, text = vectors(n_image), vectors(len(owner))
  image[5] = image[2]
  text[np.flatnonzero(owner != owner[0])[:3]] = text[0]  # the same caption, other images
  scores = (text.astype(np.float64) @ image.T.astype(np.float64)).astype(np.float32)
  return text * 2, image * 0.5, owner, scores  # powers of two: normalisation stays exact


def _official_hits(scores, owner, k, top_k):
  """Per query, the official recall_at_k test with the given top-k: is one of the query's
  positives among the k candidates kept? Captions first (text->image), then images."""
  positive = np.zeros(scores.shape, bool)
  positive[np.arange(len(owner)), owner] = True
  hits = []
  for s, pos in ((scores, positive), (scores.T, positive.T)):
    top = top_k(torch.from_numpy(np.ascontiguousarray(s)), min(k, s.shape[1])).numpy()
    hits.append(np.take_along_axis(pos, top, 1).any(1))
  return hits


def _lowest_index_topk(s, k):
  """CUDA top-k's set: the k largest, equal values taken in index order."""
  return torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]


def _cpu_topk(s, k):
  return torch.topk(s, k, dim=1).indices


def _unambiguous(s, k):
  """Rows whose top-k set does not depend on how ties are ordered."""
  v = np.sort(np.where(np.isnan(s), np.inf, s), axis=1)[:, ::-1]
  return (k >= s.shape[1]) | (v[:, min(k, s.shape[1]) - 1] != v[:, min(k, s.shape[1] - 1)])


@pytest.mark.parametrize("max_scores", [64, 1 << 21])
def test_official_rule_reproduces_torch_topk_on_exact_ties(max_scores):
  rng = np.random.default_rng(5)
  text, image, owner, scores = _exact_tie_problem(rng, n_image=40, max_captions=4)
  got = {r: metrics.retrieval_ranks(text, image, owner, r, max_scores=max_scores)
         for r in metrics.TIE_RULES}
  for rule, ranks in got.items():
    _check_ranks(ranks, scores, owner, rule)
  checked_ambiguous = tied_at_cutoff = 0
  for k in (1, 2, 5, 10):
    want = _official_hits(scores, owner, k, _lowest_index_topk)
    cpu = _official_hits(scores, owner, k, _cpu_topk)
    official = (got["official"].text_rank < k, got["official"].image_rank < k)
    for hits, cpu_hits, ours, s in zip(want, cpu, official, (scores, scores.T)):
      np.testing.assert_array_equal(ours, hits)
      sure = _unambiguous(s, k)
      np.testing.assert_array_equal(ours[sure], cpu_hits[sure])
      checked_ambiguous += (~sure).sum()
    # The tie counts say exactly which queries the rule can flip.
    recall = metrics.recall_at_k(got["official"], ks=(k,))
    for name, field in (("image_retrieval", "text_rank"), ("text_retrieval", "image_rank")):
      may_hit = getattr(got["optimistic"], field) < k
      must_hit = getattr(got["pessimistic"], field) < k
      assert recall[f"{name}_tied@{k}"] == (may_hit & ~must_hit).sum()
      assert recall[f"{name}_recall@{k}"] == np.mean(getattr(got["official"], field) < k)
      tied_at_cutoff += recall[f"{name}_tied@{k}"]
  assert checked_ambiguous > 0 and tied_at_cutoff > 0  # cut-offs inside a tie


def test_collapsed_image_tower_scores_chance_not_perfect():
  """Every image the same vector: the official top-k keeps the lowest-index images, so
  image R@k = k/N, not the 1.0 that ties-favour-the-query gave."""
  rng = np.random.default_rng(6)
  n = 50
  image = np.tile(rng.standard_normal((1, 16)).astype(np.float32), (n, 1))
  text = rng.standard_normal((n, 16)).astype(np.float32)
  owner = rng.permutation(n)
  official = metrics.recall_at_k(metrics.retrieval_ranks(text, image, owner))
  optimistic = metrics.recall_at_k(metrics.retrieval_ranks(text, image, owner, "optimistic"))
  for k in metrics.RECALL_KS:
    assert official[f"image_retrieval_recall@{k}"] == pytest.approx(k / n)
    assert optimistic[f"image_retrieval_recall@{k}"] == 1.0
    assert official[f"image_retrieval_tied@{k}"] == n
  want = _official_hits(_rounded_scores(text, image), owner, 1, _lowest_index_topk)[0]
  assert official["image_retrieval_recall@1"] == want.mean()


def test_nan_features_rank_as_torch_does():
  """NaN weights give NaN scores; torch's top-k puts NaN first and treats NaNs as equal,
  so the official answer is the lowest-index candidates (R@1 = 1/N), not a perfect 1.0."""
  rng = np.random.default_rng(7)
  n = 20
  text = rng.standard_normal((n, 8)).astype(np.float32)
  image = np.full((n, 8), np.nan, np.float32)
  owner = np.arange(n)
  got = metrics.recall_at_k(metrics.retrieval_ranks(text, image, owner))
  scores = np.full((n, n), np.nan, np.float32)
  for k in metrics.RECALL_KS:
    want = _official_hits(scores, owner, k, _lowest_index_topk)
    assert got[f"image_retrieval_recall@{k}"] == want[0].mean() == pytest.approx(k / n)
    assert got[f"text_retrieval_recall@{k}"] == want[1].mean() == pytest.approx(k / n)
    assert got[f"image_retrieval_tied@{k}"] == got[f"text_retrieval_tied@{k}"] == n


def test_duplicate_caption_under_an_earlier_image_goes_first():
  """Image 1's caption is also a caption of image 0, earlier in the file: the official
  top-1 for image 1 is image 0's copy, so image 1 is not retrieved at 1."""
  rng = np.random.default_rng(8)
  image = rng.standard_normal((3, 8)).astype(np.float32)
  text = np.stack([image[0], image[1], image[1], image[2]])
  owner = np.array([0, 0, 1, 2])  # the copy under image 0 comes first
  ranks = {r: metrics.retrieval_ranks(text, image, owner, r) for r in metrics.TIE_RULES}
  assert (ranks["official"].image_rank[1], ranks["optimistic"].image_rank[1],
          ranks["pessimistic"].image_rank[1]) == (1, 0, 1)
  assert ranks["official"].image_tied[1] == 1
  want = _official_hits(_rounded_scores(text, image), owner, 1, _lowest_index_topk)[1]
  np.testing.assert_array_equal(ranks["official"].image_rank < 1, want)
  # With image 1's own copy first in the file, the tie goes its way.
  swapped = metrics.retrieval_ranks(text, image, np.array([0, 1, 0, 2]))
  assert swapped.image_rank[1] == 0


def test_order_key_follows_torch_radix_order():
  values = np.array([-np.inf, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, np.inf], np.float32)
  keys = np.asarray(metrics._order_key(jnp.asarray(values)))
  assert np.all(np.diff(keys.astype(np.int64)) > 0)
  nans = np.asarray(metrics._order_key(jnp.asarray(np.array([np.nan, -np.nan], np.float32))))
  assert np.all(nans == nans[0]) and nans[0] > keys[-1]


def test_unknown_tie_rule_is_refused():
  with pytest.raises(cli.UserError, match="tie_rule='lucky'"):
    metrics.retrieval_ranks(np.ones((2, 4)), np.ones((2, 4)), [0, 1], "lucky")


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
  """Python-loop bookkeeping as in the official evaluation (torch.argmax: the first
  maximum, NaN as the largest), plus the questions whose maximum is shared."""
  n = len(metrics.TYPE_NAMES)
  correct, total, confusion = np.zeros(n, int), np.zeros(n, int), np.zeros((n, n), int)
  tied = 0
  for row, a, q, types in zip(logits, answer, qtype, otypes):
    chosen = int(torch.argmax(torch.from_numpy(row)))
    top = np.where(np.isnan(row), np.inf, row)
    tied += (top == top[chosen]).sum() > 1
    total[q] += 1
    if chosen == a:
      correct[q] += 1
    else:
      confusion[q, types[chosen]] += 1
  return correct, total, confusion, tied


def test_mcq_counts_over_uneven_padded_batches():
  rng = np.random.default_rng(3)
  n, o, batch = 23, 4, 8
  logits = rng.standard_normal((n, o)).astype(np.float32)
  logits[0] = 1.0  # a full tie: the first option is chosen
  logits[1, [1, 3]] = logits[1].max() + 1  # two options share the maximum
  logits[2, [0, 1]] = logits[2].min() - 1  # a tie below the maximum does not count
  logits[3, [2, 3]] = np.nan  # NaN is the largest (torch.argmax), NaNs tie
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
  correct, total, confusion, tied = _numpy_mcq(logits, answer, qtype, otypes)
  assert tied == 3
  np.testing.assert_array_equal(summed["correct"], correct)
  np.testing.assert_array_equal(summed["total"], total)
  np.testing.assert_array_equal(summed["confusion"], confusion)
  summary = metrics.mcq_summary(summed)
  assert summary["num_questions"] == n
  assert summary["num_tied_questions"] == tied
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
  got = metrics.retrieval_ranks(text, image, owner, max_scores=300 * 200)
  _check_ranks(got, _rounded_scores(text, image), owner, "official")
