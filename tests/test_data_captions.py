"""The caption engine: every caption's truth is checked against the annotation."""
import collections
import re

import numpy as np
import pytest

from negjax.data import captions
from negjax.data import shapes

COCO_LIKE = ("person", "dog", "cat", "apple", "umbrella", "car", "orange", "chair")


def _cases(n=300):
  """Shapes-world items plus COCO-like ones whose absent objects come from the vocabulary."""
  for index in range(n):
    scene = shapes.sample_scene(shapes.scene_rng(0, 0, index))
    yield [o.name for o in scene.objects], scene.absent, captions.caption_rng(0, 0, index)
  for index in range(n):
    rng = captions.caption_rng(1, 0, index)
    present = list(rng.choice(COCO_LIKE, size=int(rng.integers(1, 4)), replace=False))
    absent = captions.complete_absent(present, (), COCO_LIKE, rng, 4)
    yield present, absent, rng


def _mentions(text, name):
  return re.search(rf"\b{re.escape(name)}\b", text) is not None


def test_negcap_negates_only_absent_and_affirms_only_present():
  templates = collections.Counter()
  for present, absent, rng in _cases():
    ann = captions.annotate(present, absent, rng)
    assert len(ann.negcap) == 3 and len({c.template for c in ann.negcap}) == 3
    for c in ann.negcap:
      templates[c.template] += 1
      assert len(c.negated) == 1 and c.negated[0] in absent and c.negated[0] not in present
      assert c.affirmed and set(c.affirmed) <= set(present)
      assert c.is_true(present)
      for name in c.affirmed + c.negated:
        assert _mentions(c.text, name), (name, c.text)
    for c in ann.affirmative:
      assert set(c.affirmed) == set(present) and not c.negated and c.is_true(present)
  assert len(templates) >= 8 and len(templates) == len(captions.NEGCAP_TEMPLATES)


def test_mcq_has_exactly_one_true_option_and_right_types():
  answer_types, positions = collections.Counter(), collections.Counter()
  for present, absent, rng in _cases():
    ann = captions.annotate(present, absent, rng)
    assert len(ann.mcq) == 4 and len({c.text for c in ann.mcq}) == 4
    truth = [c.is_true(present) for c in ann.mcq]
    assert truth.count(True) == 1 and truth.index(True) == ann.answer
    assert {c.kind for c in ann.mcq} == set(captions.MCQ_TYPES)  # every template present
    for c in ann.mcq:  # the recorded type matches the wording and the objects used
      assert set(c.affirmed) | set(c.negated) <= set(present) | set(absent)
      if c.kind == "positive":
        assert c.text.startswith("this image features") and " not " not in c.text
        assert c.affirmed and not c.negated
      elif c.kind == "negative":
        assert c.text.startswith("this image does not feature")
        assert not c.affirmed and len(c.negated) == 1
      else:
        assert c.kind == "hybrid" and " but not " in c.text
        assert len(c.affirmed) == 1 and len(c.negated) == 1
      if not c.is_true(present):  # a distractor swaps objects: something wrong in it
        assert set(c.affirmed) - set(present) or set(c.negated) & set(present)
    answer_types[ann.answer_type] += 1
    positions[ann.answer] += 1
  assert set(answer_types) == set(captions.MCQ_TYPES) and min(answer_types.values()) > 100
  assert set(positions) == {0, 1, 2, 3} and min(positions.values()) > 80


def test_mcq_answer_weights_pick_the_true_options_type():
  counts = collections.Counter()
  for present, absent, rng in _cases(150):
    options, answer = captions.mcq(present, absent, rng, answer_weights=(0, 1, 0))
    assert options[answer].kind == "negative" and options[answer].is_true(present)
    assert [o.is_true(present) for o in options].count(True) == 1
    options, answer = captions.mcq(present, absent, rng, answer_weights=(1, 2, 1))
    counts[options[answer].kind] += 1
  assert 0.4 < counts["negative"] / sum(counts.values()) < 0.6
  for bad in ((1, 1), (1, -1, 1), (0, 0, 0)):
    with pytest.raises(ValueError, match="answer_weights"):
      captions.mcq(("red circle",), ("blue star", "red star"), np.random.default_rng(0),
                   answer_weights=bad)


def test_same_seed_same_captions_different_seed_differs():
  present, absent = ("red circle", "blue star"), ("green ring", "red star", "blue circle")
  a = captions.annotate(present, absent, captions.caption_rng(0, 0, 7))
  b = captions.annotate(present, absent, captions.caption_rng(0, 0, 7))
  assert a == b
  others = [captions.annotate(present, absent, captions.caption_rng(0, 0, i)) for i in range(8)]
  assert len({o.negcap for o in others}) > 1


def test_complete_absent_keeps_given_and_samples_the_rest():
  rng = np.random.default_rng(0)
  out = captions.complete_absent(["dog"], ["cat", "dog"], COCO_LIKE, rng, 4)
  assert out[0] == "cat" and len(out) == 4 and "dog" not in out
  assert set(out) <= set(COCO_LIKE)
  assert captions.complete_absent(["dog"], [], ["dog"], rng, 4) == ()


def test_articles_and_lists_read_naturally():
  assert captions.join(["apple"]) == "an apple"
  assert captions.join(["red circle", "orange star", "dog"]) == (
      "a red circle, an orange star and a dog")


def test_empty_or_contradictory_objects_raise():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="no present"):
    captions.annotate((), ("cat",), rng)
  with pytest.raises(ValueError, match="no absent"):
    captions.annotate(("cat",), (), rng)
  with pytest.raises(ValueError, match="both present and absent"):
    captions.annotate(("cat", "dog"), ("dog",), rng)


def shout(text):
  """A toy paraphraser, importable by path."""
  return text.upper()


def shout_all(texts):
  return [t.upper() + "!" for t in texts]


def test_paraphraser_hook_rewrites_text_and_keeps_structure():
  present, absent = ("red circle",), ("blue star", "green ring")
  plain = captions.annotate(present, absent, captions.caption_rng(0, 0, 1))
  fn = captions.load_paraphraser("test_data_captions:shout")
  loud = captions.annotate(present, absent, captions.caption_rng(0, 0, 1), paraphraser=fn)
  for p, q in zip(plain.negcap + plain.mcq, loud.negcap + loud.mcq):
    assert q.text == p.text.upper() and (q.affirmed, q.negated) == (p.affirmed, p.negated)
  fn = captions.load_paraphraser("test_data_captions.shout_all")  # dotted form
  batched = captions.annotate(present, absent, captions.caption_rng(0, 0, 1), paraphraser=fn,
                              paraphraser_batched=True)
  assert all(c.text.endswith("!") for c in batched.affirmative + batched.mcq)
  assert batched.answer == plain.answer
  with pytest.raises(ValueError, match="cannot import paraphraser"):
    captions.load_paraphraser("test_data_captions:nope")
