"""The shapes-CLIP shipped in negjax: small, read through the same path as real weights,
and biased towards affirmation the way NegBench says CLIP is."""
import os

import pytest

from negjax import evaluate, train
from negjax.data import make
from negjax.models import clip, weights


def test_packaged_checkpoint_is_small_and_loads_like_real_weights():
  path = train.SHAPES_CHECKPOINT
  assert os.path.getsize(path) <= 20 * 2 ** 20
  model = weights.load_model(path)  # no arch given: recorded in the file
  assert clip.architecture_name(model.config) == "negjax-shapes"


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("shapes_eval"))
  make.build(make.default_config("shapes", out=out, train_size=0, eval_size=120, seed=7,
                                 workers=1, progress=False))
  return [os.path.join(out, "eval", f) for f in sorted(os.listdir(os.path.join(out, "eval")))
          if f.endswith(".csv")]


def test_packaged_model_knows_objects_but_not_negation(eval_files):
  model = weights.load_model(train.SHAPES_CHECKPOINT)
  results = evaluate.evaluate_files(model, eval_files, batch_size=64, progress=False)
  mcq = results["shapes_val_mcq"]
  print(mcq)
  # Trained on affirmative captions only: it finds the objects in an image ...
  assert results["shapes_val_retrieval"]["image_retrieval_recall@10"] > 0.3
  assert mcq["positive_accuracy"] > 0.35  # chance is 0.25
  # ... and reads "no X" as "X": negation questions go wrong far more often than chance.
  assert mcq["negative_accuracy"] < 0.25 < mcq["positive_accuracy"]
