"""The TFDS builder yields the same examples as `negjax.data.make`, without TensorFlow."""
import sys

import numpy as np

from negjax.data import make
from negjax.data import records
from negjax.data import tfds_builder


def test_tfds_builder_matches_make(tmp_path):
  config = make.default_config("shapes", train_size=12, eval_size=5, progress=False)
  builder = tfds_builder.NegationData(data_dir=str(tmp_path / "tfds"),
                                      config=tfds_builder.builder_config(config))
  builder.download_and_prepare()
  assert builder.info.splits["train"].num_examples == 12
  assert builder.info.splits["validation"].num_examples == 5
  config.out, config.workers, config.shards = str(tmp_path / "make"), 1, 3
  make.build(config)
  ours = records.training_source(tmp_path / "make" / "train")
  theirs = records.training_source(builder.data_path)  # TFDS shuffles records by key
  by_key = {theirs[i]["key"]: theirs[i] for i in range(len(theirs))}
  assert sorted(by_key) == sorted(ours[i]["key"] for i in range(len(ours)))
  for i in range(len(ours)):
    a, b = ours[i], by_key[ours[i]["key"]]
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  assert "tensorflow" not in sys.modules


def test_builder_config_names_differ_per_config():
  a = tfds_builder.builder_config(make.default_config("shapes", train_size=10))
  b = tfds_builder.builder_config(make.default_config("shapes", train_size=11))
  c = tfds_builder.builder_config(make.default_config("shapes", train_size=10, workers=2))
  assert a.name != b.name and a.name == c.name  # workers do not change the data
