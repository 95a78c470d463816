"""Tokens/s and strings/s of negjax's tokenizer against open_clip's, on the same strings.

  python benchmarks/tokenizer.py --n 4000 --repeats 3

Strings are NegBench-like captions (negations, punctuation, numbers, some
accents/CJK/emoji/HTML entities). "cold" is the first pass with an empty word
cache (a fresh tokenizer on each side), "warm" the best later pass over the same
strings. Both sides produce [N, 77] ids; the ratio is negjax / open_clip.
"""
import argparse
import time

import numpy as np

from negjax import tokenizer as tk
from negjax.reference import open_clip

OBJECTS = ["dog", "cat", "bicycle", "car", "person", "tree", "cup", "laptop", "pizza",
           "umbrella", "giraffe", "traffic light", "surfboard", "kitchen sink", "teddy bear"]
PLACES = ["on the grass", "in a kitchen", "next to a table", "near the beach",
          "at night", "in the street", "under a bridge", "inside a café"]
TEMPLATES = [
    "A photo of a {a} {p}.",
    "There is a {a} but no {b} in this image.",
    "This image shows a {a}, not a {b}.",
    "A {a} {p} without any {b}.",
    "Is there a {b}? No, it isn't there; only a {a}.",
    "{n} {a}s and {m} {b}s {p}",
    "A {A} that doesn't have a {b} nearby!",
]
EXTRAS = ["", "", "", "", " 🐶", " (日本)", " &amp; more", " — naïve", "  \n", " 100%"]


def make_strings(n, seed=0):
  rng = np.random.default_rng(seed)
  pick = lambda xs: xs[int(rng.integers(len(xs)))]
  out = []
  for _ in range(n):
    a, b = pick(OBJECTS), pick(OBJECTS)
    text = pick(TEMPLATES).format(a=a, b=b, A=a.upper(), p=pick(PLACES),
                                  n=int(rng.integers(2, 100)), m=int(rng.integers(2, 10)))
    out.append(text + pick(EXTRAS))
  return out


def run(fn, texts, repeats):
  start = time.perf_counter()
  ids = fn(texts)
  cold = time.perf_counter() - start
  warm = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn(texts)
    warm = min(warm, time.perf_counter() - start)
  return np.asarray(ids), cold, warm


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=4000)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  texts = make_strings(args.n)
  oc = open_clip()
  ours = tk.Tokenizer()
  ref = oc.tokenizer.SimpleTokenizer()
  ids, ours_cold, ours_warm = run(lambda t: ours(t, 77), texts, args.repeats)
  ref_ids, ref_cold, ref_warm = run(lambda t: ref(t, 77).numpy(), texts, args.repeats)
  assert np.array_equal(ids, ref_ids), "negjax and open_clip disagree"
  tokens = int((ids != 0).sum())  # SOT/EOT included; id 0 ("!") is absent from these strings

  print(f"{args.n} strings, {tokens} tokens ({tokens / args.n:.1f}/string), context 77")
  print(f"{'':10s} {'cold tok/s':>12s} {'cold str/s':>12s} {'warm tok/s':>12s} {'warm str/s':>12s}")
  for name, cold, warm in [("negjax", ours_cold, ours_warm), ("open_clip", ref_cold, ref_warm)]:
    print(f"{name:10s} {tokens / cold:12,.0f} {args.n / cold:12,.0f} "
          f"{tokens / warm:12,.0f} {args.n / warm:12,.0f}")
  print(f"ratio negjax/open_clip: cold {ref_cold / ours_cold:.2f}x, warm {ref_warm / ours_warm:.2f}x")


if __name__ == "__main__":
  main()
