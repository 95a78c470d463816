"""The caption engine: every caption's truth is checked against the annotation."""
import collections
import dataclasses
import os
import re

import numpy as np
import pytest

from negjax.data import captions
from negjax.data import shapes

COCO_LIKE = ("person", "dog", "cat", "apple", "umbrella", "car", "orange", "chair")


def _cases(n=300):
  """Shapes-world items (a closed world: the objects are all there is) plus COCO-like ones
  (open: photos hold unlabelled things) whose absent objects come from the vocabulary."""
  for index in range(n):
    scene = shapes.sample_scene(shapes.scene_rng(0, 0, index))
    yield ([o.name for o in scene.objects], scene.absent, captions.caption_rng(0, 0, index),
           True)
  for index in range(n):
    rng = captions.caption_rng(1, 0, index)
    present = list(rng.choice(COCO_LIKE, size=int(rng.integers(1, 4)), replace=False))
    absent = captions.complete_absent(present, (), COCO_LIKE, rng, 4)
    yield present, absent, rng, False


def _mentions(text, name):
  return re.search(rf"\b{re.escape(name)}\b", text) is not None


def test_negcap_negates_only_absent_and_affirms_only_present():
  templates = collections.Counter()
  for present, absent, rng, closed in _cases():
    ann = captions.annotate(present, absent, rng, closed_world=closed)
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
  for present, absent, rng, closed in _cases():
    ann = captions.annotate(present, absent, rng, closed_world=closed)
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
  for present, absent, rng, _ in _cases(150):
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
  fn = captions.load_paraphraser("test_data_captions.shout_all", batched=True)  # dotted form
  batched = captions.annotate(present, absent, captions.caption_rng(0, 0, 1), paraphraser=fn,
                              paraphraser_batched=True)
  assert all(c.text.endswith("!") for c in batched.affirmative + batched.mcq)
  assert batched.answer == plain.answer
  with pytest.raises(captions.ParaphraserError, match="cannot import paraphraser"):
    captions.load_paraphraser("test_data_captions:nope")


# Words by which a caption claims its objects are all there is ("no cat, only a dog").
EXCLUSIVE_WORDS = re.compile(r"\b(only|just|nothing but|nothing else|alone|solely|exclusively)\b")
# Words that would claim a count, which the annotations do not give.
COUNT_WORDS = re.compile(r"\b(one|two|three|four|both|single|several|many|all|every|\d+)\b")


def test_every_caption_is_true_and_only_claims_name_every_object():
  """Every caption of every kind, judged from its wording: an "only A" / "just A" caption is
  true only if A is exactly the present objects, and only in a closed world."""
  exclusive = collections.Counter()
  for present, absent, rng, closed in _cases():
    ann = captions.annotate(present, absent, rng, closed_world=closed)
    for c in ann.affirmative + ann.negcap + (ann.mcq[ann.answer],):
      assert c.is_true(present), c
      assert not c.negated or c.negated[0] not in present
      if EXCLUSIVE_WORDS.search(c.text):
        assert closed, f"exclusive claim about an open-world image: {c.text!r}"
        assert sorted(c.affirmed) == sorted(present), (c.text, present)
        assert c.exclusive
        exclusive[c.template] += 1
      else:
        assert not c.exclusive
      assert not COUNT_WORDS.search(c.text), c.text
  assert set(exclusive) == captions.EXCLUSIVE and min(exclusive.values()) > 30


def test_truth_model_holds_only_claims_to_exactly_the_present_objects():
  only = captions.Caption("no cat, only a dog and a car", "negcap", "no_only", ("dog", "car"),
                          ("cat",), exclusive=True)
  assert only.is_true({"dog", "car"})
  assert not only.is_true({"dog", "car", "chair"})  # "only" leaves out the chair
  assert not only.is_true({"dog", "car", "cat"})
  plain = dataclasses.replace(only, text="a dog and a car but no cat", exclusive=False)
  assert plain.is_true({"dog", "car", "chair"}) and not plain.is_true({"dog"})


def test_template_wording_agrees_with_the_exclusive_set():
  tables = {"affirmative": captions.AFFIRMATIVE_TEMPLATES, "negcap": captions.NEGCAP_TEMPLATES,
            "mcq": captions.MCQ_TEMPLATES}
  for kind, table in tables.items():
    for name, template in table.items():
      says_only = EXCLUSIVE_WORDS.search(template) is not None
      assert says_only == (kind == "negcap" and name in captions.EXCLUSIVE), (kind, name)
      assert not COUNT_WORDS.search(template), (kind, name)


def test_shapes_captions_fit_the_demo_text_length():
  """Training cuts texts at data.text_length: a cut "only A, B and C" would drop objects."""
  from negjax import cli
  from negjax.tokenizer import get_tokenizer
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "negclip.py")
  limit = cli.load_config(path).data.text_length
  encode, longest = get_tokenizer().encode, 0
  for index in range(400):
    scene = shapes.sample_scene(shapes.scene_rng(0, 0, index), max_objects=4)
    ann = captions.annotate([o.name for o in scene.objects], scene.absent,
                            captions.caption_rng(0, 0, index), closed_world=True)
    for c in ann.affirmative + ann.negcap + ann.mcq:
      longest = max(longest, len(encode(c.text)) + 2)  # + start and end tokens
  assert longest <= limit
