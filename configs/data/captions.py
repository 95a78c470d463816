"""Image-text pairs (a caption CSV) -> NegCap/NegMCQ data, objects extracted from captions.

  # built-in vocabulary matcher (COCO categories, plurals, synonyms; no model)
  python -m negjax.data.make --config configs/data/captions.py --config.out=/data/negcc \\
      --config.train_csv=/data/cc3m_train.tsv --config.eval_csv=/data/cc3m_val.tsv

  # an OpenAI-compatible endpoint you run (vLLM: `vllm serve MODEL`; llama.cpp: llama-server)
  python -m negjax.data.make --config configs/data/captions.py --config.out=/data/negcc \\
      --config.train_csv=/data/cc3m_train.tsv --config.extractor=chat \\
      --config.extractor_url=http://localhost:8000/v1 --config.extractor_model=MODEL \\
      --config.extractor_cache=/data/negcc-objects.jsonl

The CSV is the official caption layout (negjax.data.official): TAB-separated, columns
`filepath` / `title` (`--config.separator`, `image_column`, `caption_column` change that).
Each caption's objects come from the extractor (negjax.data.extract): present = named in
the caption, absent = negated in it or proposed (plausible, unmentioned), then the caption
engine writes NegCap / NegMCQ as for COCO. Rows whose caption names no known object (the
vocabulary matcher) or that the endpoint cannot answer are skipped, counted and listed in
summary.json; an unreachable endpoint stops with one error line. The "only"/"just"
templates are not used (a caption does not list everything in a photo).
"""
from negjax.data import make


def get_config():
  return make.default_config("captions", shards=16)
