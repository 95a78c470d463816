"""Training-free ways to score a text against images, for search and for the evaluator.

- "plain": the text's embedding, as CLIP scores any caption.
- "decompose": a text the caption grammar reads as "affirmed but not negated"
  (`negjax.data.captions.parse`) scores sim(image, affirmed) - alpha * sim(image, negated);
  any other text is scored plainly. One template grammar writes the captions and reads the
  queries: no second grammar, so a query outside it is never half-understood.

Either way a text becomes one query vector q with score = <normalised image, q>: the
decomposed score is linear in the two unit vectors, q = affirmed - alpha * negated.
"""
import numpy as np

from negjax.data import captions

BASELINES = ("plain", "decompose")
DEFAULT_ALPHA = 1.0


def check(baseline, alpha):
  from negjax import cli
  if baseline not in BASELINES:
    raise cli.UserError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
  if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha >= 0):
    raise cli.UserError(f"alpha must be a finite number >= 0, got {alpha!r}")


def _unit(x):
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def query_vectors(encode, texts, baseline="plain", alpha=DEFAULT_ALPHA):
  """[N, D] float32 query vectors, and how many texts were decomposed.

  `encode(list of str) -> [n, D] features` (unnormalised, e.g. `evaluate.encode_texts`).
  Every distinct string is encoded once, whole texts and parts alike.
  """
  check(baseline, alpha)
  texts = list(texts)
  parts = [captions.parse(t) if baseline == "decompose" else None for t in texts]
  wanted = []
  for text, part in zip(texts, parts):
    wanted += [text] if part is None else [p for p in (part.affirmed, part.negated) if p]
  unique = list(dict.fromkeys(wanted))
  feats = _unit(encode(unique)) if unique else np.zeros((0, 0), np.float32)
  row = {t: i for i, t in enumerate(unique)}
  out = []
  for text, part in zip(texts, parts):
    if part is None:
      out.append(feats[row[text]])
      continue
    q = -alpha * feats[row[part.negated]]
    if part.affirmed:
      q = q + feats[row[part.affirmed]]
    out.append(q)
  dim = feats.shape[1] if len(feats) else 0
  return np.stack(out).astype(np.float32) if out else np.zeros((0, dim), np.float32), \
      sum(p is not None for p in parts)


class Scored:
  """The evaluator's encoders with texts scored by a baseline (`negjax.evaluate`).

  The metrics L2-normalise both sides before the dot product, which would rescale each
  decomposed query by its own norm and change the ranking. So every query vector is
  divided by (1 + alpha), the largest norm a query can have, and given one extra coordinate
  that makes its norm 1; images get a 0 there. The normalised dot product is then exactly
  score / (1 + alpha) for every text: the same order, per image and per text.
  """

  def __init__(self, enc, baseline, alpha):
    check(baseline, alpha)
    self.enc, self.baseline, self.alpha = enc, baseline, float(alpha)
    self.decomposed = 0  # texts decomposed since the last `take_count`

  def __getattr__(self, name):  # image_size, context_length, ...: the encoders'
    return getattr(self.enc, name)

  def image(self, images):
    import jax.numpy as jnp
    return jnp.pad(self.enc.image(images), ((0, 0), (0, 1)))

  def take_count(self):
    n, self.decomposed = self.decomposed, 0
    return n

  def texts(self, texts, batch_size):
    from negjax import evaluate
    q, n = query_vectors(lambda t: evaluate.encode_texts(self.enc, t, batch_size), texts,
                         self.baseline, self.alpha)
    self.decomposed += n
    q = q / (1 + self.alpha)
    rest = np.sqrt(np.maximum(0.0, 1.0 - (q * q).sum(-1, keepdims=True)))
    return np.concatenate([q, rest], axis=-1).astype(np.float32)
