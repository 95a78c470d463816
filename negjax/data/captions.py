"""Caption engine: affirmative captions, NegCap and NegMCQ from a list of objects.

One code path for every source (shapes world, COCO, CSV): it sees only the present and
absent object names of an image and a per-image random generator. Each caption carries
which objects it affirms and which it negates, and whether it claims those are the only ones
there, so its truth can be checked against the annotation instead of trusted.
"""
import dataclasses
import importlib
import re

import numpy as np

from negjax import cli

AFFIRMATIVE_TEMPLATES = {
    "photo_of": "a photo of {A}",
    "plain": "{A}",
    "image_with": "an image with {A}",
    "there_is": "there is {A}",
    "picture_showing": "a picture showing {A}",
}
# {A}: affirmed objects with articles; {n}: negated object bare; {a_n}: with an article.
NEGCAP_TEMPLATES = {
    "but_no": "{A} but no {n}",
    "no_only": "no {n}, only {A}",
    "without_any": "{A} without any {n}",
    "there_is_and_no": "there is {A} and no {n}",
    "and_there_is_no": "{A}, and there is no {n}",
    "no_in_sight": "a picture of {A} with no {n} in sight",
    "shown_but_not": "{A} {be} shown, but not {a_n}",
    "has_but_not": "this image has {A} but does not have {a_n}",
    "just": "no {n} here, just {A}",
    "containing_not": "an image containing {A} but not {a_n}",
    "not_present": "{A}; no {n} is present",
}
# Templates that say the affirmed objects are the only ones there. Such a claim is true only
# in a closed world, where the annotation lists everything in the image (the shapes world; not
# COCO or a CSV, whose photos hold unlabelled things), and only if it names every present
# object: these templates affirm all of them, and are not used for open-world sources.
EXCLUSIVE = frozenset({"no_only", "just"})
MCQ_TEMPLATES = {
    "positive": "this image features {A}",
    "negative": "this image does not feature {a_n}",
    "hybrid": "this image features {A} but not {a_n}",
}
MCQ_TYPES = tuple(MCQ_TEMPLATES)


class Unannotatable(ValueError):
  """These objects cannot make the captions (none present or absent, too few for an MCQ):
  the data engine skips the image and lists why."""


class ParaphraserError(cli.UserError):
  """The configured paraphraser cannot be imported or does not return one str per text."""


@dataclasses.dataclass(frozen=True)
class Caption:
  text: str
  kind: str  # "affirmative", "negcap", or the MCQ type: "positive" / "negative" / "hybrid"
  template: str  # key into the template table of its kind
  affirmed: tuple = ()
  negated: tuple = ()
  exclusive: bool = False  # says the affirmed objects are the only ones there ("only A")

  def is_true(self, present):
    """Every affirmed object present, every negated one absent; "only A" also needs the
    present objects to be exactly A."""
    present, affirmed = set(present), set(self.affirmed)
    if self.exclusive and affirmed != present:
      return False
    return affirmed <= present and not set(self.negated) & present


@dataclasses.dataclass(frozen=True)
class Annotated:
  """Everything generated for one image."""
  present: tuple
  absent: tuple
  affirmative: tuple  # of Caption
  negcap: tuple  # of Caption
  mcq: tuple  # of 4 Caption, in shuffled order
  answer: int  # index of the true option

  @property
  def answer_type(self):
    return self.mcq[self.answer].kind


@dataclasses.dataclass(frozen=True)
class Negation:
  """A negated text split by `parse`: what it affirms and what it negates, as written."""
  affirmed: str  # "" when only a negation is stated ("this image does not feature a cat")
  negated: str
  template: str


def _template_pattern(template):
  """A template as a regex: {A} and {n} capture a phrase, {a_n} one with its article."""
  parts = re.split(r"(\{A\}|\{n\}|\{a_n\}|\{be\})", template)
  fields = {"{A}": r"(?P<A>.+?)", "{n}": r"(?P<n>.+?)", "{a_n}": r"(?P<n>an? .+?)",
            "{be}": r"(?:is|are)"}
  return re.compile("".join(fields.get(p, re.escape(p)) for p in parts), re.IGNORECASE)


# Every template that negates something, most literal text first, so that the most specific
# template claims a text ("there is A and no n" before "A but no n" style fallbacks).
_NEGATION_PATTERNS = sorted(
    [(name, _template_pattern(t)) for name, t in NEGCAP_TEMPLATES.items()]
    + [(f"mcq_{k}", _template_pattern(MCQ_TEMPLATES[k])) for k in ("negative", "hybrid")],
    key=lambda x: -len(re.sub(r"\(\?P<\w+>[^)]*\)|\(\?:[^)]*\)", "", x[1].pattern)))


def parse(text):
  """The affirmed and negated parts of a text written in one of the negating templates
  above (NegCap, and the negative/hybrid MCQ options), or None for any other text.

  The same grammar that writes the captions reads them: "a red circle but no blue square"
  -> Negation("a red circle", "blue square", "but_no"). Case and a final full stop are
  ignored. A text in none of the templates is None, never a guess: callers fall back to
  using the whole text.
  """
  text = " ".join(str(text).split()).rstrip(".").strip()
  for name, pattern in _NEGATION_PATTERNS:
    match = pattern.fullmatch(text)
    if match:
      fields = match.groupdict()
      return Negation(fields.get("A") or "", fields["n"], name)
  return None


def caption_rng(seed, split, index):
  """Per-image generator: output does not depend on how images are split among workers."""
  return np.random.default_rng((seed, split, index, 1))


def with_article(name):
  return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def join(names):
  """'a red circle', 'a red circle and a blue star', 'a, b and c'."""
  phrases = [with_article(n) for n in names]
  return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def fill(template, affirmed=(), negated=None):
  return template.format(
      A=join(affirmed) if affirmed else "", be="is" if len(affirmed) == 1 else "are",
      n=negated or "", a_n=with_article(negated) if negated else "")


def complete_absent(present, absent, vocabulary, rng, k):
  """Keeps given absent objects; when fewer than k, samples more from the vocabulary.

  Used for COCO and CSV inputs, where absence is only known as "a category not present".
  """
  present = set(present)
  absent = [a for a in dict.fromkeys(absent) if a not in present]
  pool = sorted(set(vocabulary) - present - set(absent))
  need = min(max(k - len(absent), 0), len(pool))
  if need:
    absent += [pool[i] for i in sorted(rng.choice(len(pool), size=need, replace=False))]
  return tuple(absent)


def _subset(objects, rng, most=2):
  """1..most distinct objects in random order."""
  n = int(rng.integers(1, min(most, len(objects)) + 1))
  return tuple(objects[i] for i in rng.choice(len(objects), size=n, replace=False))


def _shuffled(objects, rng):
  return tuple(objects[i] for i in rng.permutation(len(objects)))


def affirmative(present, rng, n=2):
  names = rng.choice(list(AFFIRMATIVE_TEMPLATES), size=n, replace=n > len(AFFIRMATIVE_TEMPLATES))
  out = []
  for name in names:
    objs = _shuffled(present, rng)
    out.append(Caption(fill(AFFIRMATIVE_TEMPLATES[name], objs), "affirmative", str(name), objs))
  return tuple(out)


def negcap(present, absent, rng, n=3, closed_world=False):
  """n captions with distinct templates, each negating 1 absent object and affirming 1-2
  present ones, or all of them for an EXCLUSIVE template (closed worlds only)."""
  templates = [t for t in NEGCAP_TEMPLATES if closed_world or t not in EXCLUSIVE]
  names = rng.choice(templates, size=n, replace=n > len(templates))
  negated = [absent[i] for i in rng.permutation(len(absent))]
  out = []
  for j, name in enumerate(names):
    exclusive = name in EXCLUSIVE
    objs = _shuffled(present, rng) if exclusive else _subset(present, rng)
    neg = negated[j % len(negated)]
    out.append(Caption(fill(NEGCAP_TEMPLATES[name], objs, neg), "negcap", str(name), objs,
                       (neg,), exclusive))
  return tuple(out)


def _option(kind, affirmed=(), negated=None):
  return Caption(fill(MCQ_TEMPLATES[kind], affirmed, negated), kind, kind, tuple(affirmed),
                 (negated,) if negated else ())


def _true_option(kind, present, absent, rng):
  if kind == "positive":
    return _option(kind, _subset(present, rng))
  neg = absent[int(rng.integers(len(absent)))]
  if kind == "negative":
    return _option(kind, negated=neg)
  return _option(kind, _subset(present, rng, most=1), neg)


def _false_option(kind, present, absent, rng):
  """A hard distractor: the same template with objects swapped."""
  pick = lambda objs: objs[int(rng.integers(len(objs)))]
  if kind == "positive":  # an absent object affirmed, sometimes beside a present one
    affirmed = [pick(absent)]
    if rng.random() < 0.5:
      affirmed.insert(int(rng.integers(2)), pick(present))
    return _option(kind, affirmed)
  if kind == "negative":  # a present object negated
    return _option(kind, negated=pick(present))
  # hybrid: swap both sides, or negate a second present / affirm a second absent object
  variants = ["swap"] + ["both_present"] * (len(present) > 1) + ["both_absent"] * (len(absent) > 1)
  variant = variants[int(rng.integers(len(variants)))]
  if variant == "swap":
    return _option(kind, (pick(absent),), pick(present))
  pool = present if variant == "both_present" else absent
  a, b = (pool[i] for i in rng.choice(len(pool), size=2, replace=False))
  return _option(kind, (a,), b)  # one side is wrong: a absent, or b present


def mcq(present, absent, rng, max_tries=20, answer_weights=None):
  """4 options: one true and a false one of every type, shuffled. The true option's type is
  uniform, or drawn with `answer_weights` (one per MCQ_TYPES entry)."""
  if answer_weights is None:
    answer_type = MCQ_TYPES[int(rng.integers(len(MCQ_TYPES)))]
  else:
    p = np.asarray(answer_weights, np.float64)
    if p.shape != (len(MCQ_TYPES),) or (p < 0).any() or not p.sum() > 0:
      raise ValueError(f"answer_weights must be {len(MCQ_TYPES)} non-negative weights for "
                       f"{MCQ_TYPES}, got {answer_weights!r}")
    answer_type = MCQ_TYPES[int(rng.choice(len(MCQ_TYPES), p=p / p.sum()))]
  true = _true_option(answer_type, present, absent, rng)
  options = [true]
  for kind in MCQ_TYPES:
    for _ in range(max_tries):
      option = _false_option(kind, present, absent, rng)
      if option.text not in {o.text for o in options}:
        break
    else:
      raise Unannotatable(f"cannot build 4 distinct MCQ options from present={present} "
                          f"absent={absent}")
    options.append(option)
  order = rng.permutation(len(options))
  return tuple(options[i] for i in order), int(np.argmax(order == 0))


def load_paraphraser(spec, batched=False):
  """Imports a paraphraser given as "package.module:function" (or "package.module.function")
  and tries it on one caption, so that a typo or a wrong return type stops a build before
  any work instead of turning every image into a skip."""
  if not spec:
    return None
  module, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError, ValueError) as e:
    raise ParaphraserError(f"cannot import paraphraser {spec!r}: {e}") from e
  if not callable(fn):
    raise ParaphraserError(f"paraphraser {spec!r} is not callable")
  probe = Caption(fill(AFFIRMATIVE_TEMPLATES["photo_of"], ("red circle",)), "affirmative",
                  "photo_of", ("red circle",))
  try:
    paraphrase((probe,), fn, batched)
  except ParaphraserError as e:
    raise ParaphraserError(f"paraphraser {spec!r} (batched={batched}): {e}") from e
  return fn


def paraphrase(captions, fn, batched=False):
  """Rewrites caption texts; which objects each caption affirms or negates is kept as is.

  The paper rephrased template captions with an LLM; `fn` is that hook (str -> str, or
  list[str] -> list[str] when batched). It must keep the meaning (and add no "only"):
  nothing re-checks it.
  """
  if fn is None or not captions:
    return tuple(captions)
  texts = [c.text for c in captions]
  new = fn(texts) if batched else [fn(t) for t in texts]
  new = list(new) if isinstance(new, (list, tuple)) else new
  if not isinstance(new, list) or len(new) != len(texts):
    raise ParaphraserError(f"returned {type(new).__name__} for {len(texts)} texts: it must "
                           f"return a list of {len(texts)} str")
  for text, out in zip(texts, new):
    if not isinstance(out, str) or not out.strip():
      raise ParaphraserError(f"returned {out!r} for {text!r}: it must return a non-empty str")
  return tuple(dataclasses.replace(c, text=t) for c, t in zip(captions, new))


def annotate(present, absent, rng, num_affirmative=2, num_negcap=3,
             paraphraser=None, paraphraser_batched=False, closed_world=False):
  """All captions of one image. Needs at least one present and one absent object.

  `closed_world`: the present objects are everything in the image (see EXCLUSIVE)."""
  present, absent = tuple(present), tuple(absent)
  if not present:
    raise Unannotatable("no present objects")
  if not absent:
    raise Unannotatable("no absent objects")
  if set(present) & set(absent):
    raise Unannotatable(f"objects both present and absent: "
                        f"{sorted(set(present) & set(absent))}")
  aff = affirmative(present, rng, num_affirmative)
  neg = negcap(present, absent, rng, num_negcap, closed_world)
  options, answer = mcq(present, absent, rng)
  if paraphraser is not None:
    caps = paraphrase(aff + neg + options, paraphraser, paraphraser_batched)
    a, n = len(aff), len(neg)
    aff, neg, options = caps[:a], caps[a:a + n], caps[a + n:]
  return Annotated(present, absent, aff, neg, options, answer)
