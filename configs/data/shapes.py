"""The shapes world: 48 objects (8 shapes x 6 colours), 1-4 per 64 px image.

  python -m negjax.data.make --config configs/data/shapes.py --config.out=/tmp/shapes

Writes DIR/train (50k records in 32 ArrayRecord shards + TFDS metadata, ~440 MB), DIR/eval
(3000 PNG images and the NegBench CSVs shapes_val_mcq.csv, shapes_val_retrieval.csv,
shapes_val_negated_retrieval.csv) and DIR/summary.json, and prints counts per template:
each of the 11 NegCap templates ~1/11 of the captions (the closed world allows "no X, only
A and B", which names every object in the image), each MCQ answer type and answer
position about equally often, nothing skipped. About 2 minutes on 2 CPU cores;
`--config.train_size=2000 --config.eval_size=200` takes seconds. The bytes written are the
same for any `--config.workers`. All knobs: negjax.data.make.default_config.
"""
from negjax.data import make


def get_config():
  return make.default_config("shapes")
