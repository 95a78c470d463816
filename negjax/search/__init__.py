"""Negation-aware image search: index a folder of images with a CLIP checkpoint, then ask
for "a red circle but no blue square" from the command line or a local web page.

  python -m negjax.search index --images DIR --checkpoint CKPT --out INDEX.npz
  python -m negjax.search query INDEX.npz "a red circle but no blue square" [--top 20]
  python -m negjax.search serve INDEX.npz [INDEX2.npz] [--port 8000]

Modules: `index` (building and reading an index), `baselines` (plain and decomposed query
scoring, shared with the evaluator), `query` (top-k), `server` (the page), `cli`.
"""
