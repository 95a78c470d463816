"""The end of the shapes demo: search the eval images with the initial and the fine-tuned
model, and show one negated query side by side.

The shapes world says exactly which objects each image holds, so every query of the form
"A but no N" has a true answer: an image with A and without N. Every such query over the
world's objects is asked of both models (and of the initial one with the training-free
decomposition baseline); the demo prints their mean precision@5 over all of them and how
often the top 5 hold the negated object, then one example, chosen by a stated rule (the
query where fine-tuning removed the most negated objects from the top 5), each result
marked right or wrong.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from negjax import evaluate
from negjax.data import captions, make, shapes
from negjax.models import weights
from negjax.search import index as index_lib
from negjax.search import query as query_lib


def candidate_queries():
  """("A but no N" text, A, N) for every ordered pair of distinct shapes-world objects."""
  template = captions.NEGCAP_TEMPLATES["but_no"]
  return [(captions.fill(template, (a,), n), a, n)
          for a in shapes.OBJECTS for n in shapes.OBJECTS if a != n]


def shapes_truth(shapes_config, folder):
  """{path relative to the eval folder: set of present object names}."""
  world = make.sources(shapes_config)[1]
  out = {}
  for i in range(len(world)):
    key, _, present, _ = world.get(i, shapes_config.image_size)
    out[os.path.join("images", f"{key}.png")] = set(present)
  return out


def _mark(present, a, n):
  if a in present and n not in present:
    return "right"
  return "wrong: " + ", ".join(([f"no {a}"] if a not in present else [])
                               + ([f"has {n}"] if n in present else []))


def compare(truth, folder, checkpoints, out_dir, top=5, batch_size=64, log=print):
  """Indexes `folder` with each of `checkpoints` ({label: checkpoint}, two of them), asks
  every candidate query of both, prints the summary and the example; returns
  (example text, {label: precision@top per query})."""
  labels = list(checkpoints)
  searchers, loaded = {}, {}
  for label, checkpoint in checkpoints.items():
    out = os.path.join(out_dir, f"{label}.npz")
    digest = index_lib.checkpoint_record(checkpoint)["sha256"]
    if os.path.exists(out) and index_lib.load(out).checkpoint["sha256"] != digest:
      os.remove(out)  # the demo's own index of an earlier run's model: made anew
    if digest not in loaded:  # each model loaded and compiled once, for index and queries
      model = weights.load_model(index_lib.checkpoint_path(checkpoint))
      loaded[digest] = model, evaluate.Encoders(model)
    model, enc = loaded[digest]
    index_lib.build(folder, checkpoint, out, batch_size, 0, None, model, enc, progress=False,
                    log=log)
    searchers[label] = query_lib.Searcher(out, encoders=enc)
  queries = [q for q in candidate_queries()
             if sum(q[1] in p and q[2] not in p for p in truth.values()) >= top]
  texts = [q[0] for q in queries]
  results, precision, negation_errors = {}, {}, {}
  runs = [(label, s, "plain") for label, s in searchers.items()]
  runs.append((f"{labels[0]} + decompose", searchers[labels[0]], "decompose"))
  for label, s, baseline in runs:
    vectors, _ = s.query_vectors(texts, baseline)
    _, rows = jax.device_get(query_lib.top_k(s.features, jnp.asarray(vectors), top))
    paths = s.index.paths
    got = [[paths[r] for r in row] for row in rows]
    results[label] = got
    precision[label] = np.array([np.mean([a in truth[p] and n not in truth[p] for p in g])
                                 for (_, a, n), g in zip(queries, got)])
    negation_errors[label] = np.array([np.mean([n in truth[p] for p in g])
                                       for (_, _, n), g in zip(queries, got)])
  first, last = labels
  # the example: fine-tuning removed the most images that hold the negated object, then
  # raised precision the most
  fixed = negation_errors[first] - negation_errors[last]
  gain = precision[last] - precision[first]
  best = int(np.lexsort((-gain, -fixed))[0])
  text, a, n = queries[best]
  log(f"\nsearch over the {len(truth)} shapes eval images, {len(queries)} queries "
      f"\"A but no N\" (each with >= {top} true images), mean over the queries:")
  for label in results:
    log(f"  {label:28s} precision@{top} {precision[label].mean():.3f}, top {top} holding "
        f"the negated object {negation_errors[label].mean():.3f}")
  log(f"example (the query where fine-tuning removed the most negated objects from the top "
      f"{top}): \"{text}\"")
  for label in labels:
    log(f"  {label} (precision@{top} {precision[label][best]:.1f}):")
    for rank, path in enumerate(results[label][best], 1):
      log(f"    {rank}. {path:28s} {_mark(truth[path], a, n)}")
  return text, precision


def after_training(config, data, initial, finetuned, workdir):
  """Called at the end of `negjax.train` on the shapes demo (nothing for other data)."""
  if config.data.dir is not None or config.eval.data_root or initial is None:
    return None
  truth = shapes_truth(config.data.shapes, data.eval_root)
  return compare(truth, data.eval_root, {"initial": initial, "fine-tuned": finetuned},
                 os.path.join(workdir, "search"), batch_size=config.eval.batch_size)
