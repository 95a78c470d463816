"""Ranking an index for a text: one jitted matmul + top-k over the features in memory.

A `Searcher` holds one index's features on the device and its model's text tower; a query
is tokenised (cut to the model's context, with a note), turned into a query vector by a
baseline (`negjax.search.baselines`) and ranked.
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from negjax import cli
from negjax.search import baselines
from negjax.search import index as index_lib


@functools.partial(jax.jit, static_argnames="k")
def top_k(features, queries, k):
  """Scores [Q, k] and rows [Q, k] of the k best of `features` [N, D] for each of `queries`
  [Q, D] (dot products; features are unit vectors)."""
  scores = jnp.dot(queries, features.T, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(scores, k)


def too_long_note(text, context_length):
  """A note when `text` has more tokens than the model reads (it is cut, as CLIP cuts)."""
  from negjax.tokenizer import get_tokenizer
  n = len(get_tokenizer().encode(text)) + 2  # with the start and end tokens
  if n <= context_length:
    return None
  return (f"note: the query is {n} tokens, longer than the model's context of {context_length}: "
          f"only its first {context_length - 2} tokens are used")


class Searcher:
  """One index and the model that made it. `checkpoint`: the checkpoint to query with; it
  must be the index's (by content). None: the one the index records. `encoders`: its
  `evaluate.Encoders`, when the caller has them already."""

  def __init__(self, path, checkpoint=None, arch=None, encoders=None):
    from negjax import evaluate
    from negjax.models import weights
    self.path = path
    self.index = index_lib.load(path)
    recorded = self.index.checkpoint
    if checkpoint is None:
      if not os.path.exists(recorded["path"]):
        raise cli.UserError(f"{path}: its checkpoint {recorded['path']} is gone; give "
                            "--checkpoint")
      record = dict(index_lib.checkpoint_record(recorded["path"]), name=recorded["name"])
      self.index.same_checkpoint(record, "the file now at that path")
    else:
      record = index_lib.checkpoint_record(checkpoint)
      self.index.same_checkpoint(record)
    if encoders is None:
      encoders = evaluate.Encoders(weights.load_model(record["path"], arch=arch))
    self.name = self.index.model
    self.checkpoint = record["name"]
    self.enc = encoders
    self.features = jnp.asarray(self.index.features)

  def query_vectors(self, texts, baseline="plain", alpha=baselines.DEFAULT_ALPHA):
    from negjax import evaluate
    batch = 8 if len(texts) <= 8 else 64  # one query, or many (the demo asks thousands)
    return baselines.query_vectors(lambda t: evaluate.encode_texts(self.enc, t, batch), texts,
                                   baseline, alpha)

  def search(self, text, top=20, baseline="plain", alpha=baselines.DEFAULT_ALPHA, notes=None):
    """[(relative path, score)] best first; `notes` (a list) collects what the user should
    know (a query cut to the context, a query the baseline could not decompose)."""
    if not text.strip():
      raise cli.UserError("the query is empty")
    note = (None if getattr(self.enc, "tokenize", None)  # a model with its own tokenizer
            else too_long_note(text, self.enc.context_length))
    q, decomposed = self.query_vectors([text], baseline, alpha)
    if notes is not None:
      if note:
        notes.append(note)
      if baseline == "decompose" and not decomposed:
        notes.append("note: no negation found by the caption templates; scored plainly")
    k = min(int(top), len(self.index.files))
    scores, rows = jax.device_get(top_k(self.features, jnp.asarray(q), k))
    paths = self.index.paths
    return [(paths[r], float(s)) for r, s in zip(rows[0], scores[0])]


def format_results(text, columns, top):
  """Text table: one column per model, rank, score and path."""
  lines = [f"query: {text}"]
  width = max([len(p) for _, results in columns for p, _ in results] + [20]) + 10
  lines.append("rank  " + "".join(f"{name:{width}s}" for name, _ in columns).rstrip())
  for i in range(top):
    cells = [f"{results[i][1]:+.4f}  {results[i][0]}" if i < len(results) else ""
             for _, results in columns]
    if not any(cells):
      break
    lines.append(f"{i + 1:4d}  " + "".join(f"{c:{width}s}" for c in cells).rstrip())
  return "\n".join(lines)


def run(index, text, top=20, compare=None, checkpoint=None, baseline="plain",
        alpha=baselines.DEFAULT_ALPHA, arch=None):
  """The `query` command: prints ranked paths with scores, side by side with `compare`."""
  if top < 1:
    raise cli.UserError(f"--top must be >= 1, got {top}")
  baselines.check(baseline, alpha)
  searchers = [Searcher(index, checkpoint, arch)]
  if compare:
    same = index_lib.load(compare).checkpoint["sha256"] == searchers[0].index.checkpoint["sha256"]
    searchers.append(Searcher(compare, None, arch, searchers[0].enc if same else None))
  notes, columns = [], []
  for s in searchers:
    columns.append((f"{s.name} [{s.checkpoint}]", s.search(text, top, baseline, alpha, notes)))
  for note in dict.fromkeys(notes):
    print(note, file=sys.stderr)
  print(format_results(text, columns, top))
  return columns
