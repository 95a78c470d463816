"""End-to-end NegBench evaluation speed: negjax against open_clip with the same weights.

  python benchmarks/evaluate.py [--data_root ~/.cache/negjax/shapes-.../eval] [--arch ViT-B-32]

Both sides read the same CSVs and images, preprocess, encode and score; the open_clip
side does it the official way (torchvision transforms, torch batches, dense score matrix
with top-k for retrieval, a Python loop for MCQ bookkeeping). Weights are random (no
downloads here) but identical: negjax writes them, open_clip loads the file. Prints
images/s (media items per second of wall time, model loading excluded) and the metrics
of both, which should agree.
"""
import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import metrics as metrics_bench  # noqa: E402  (the official retrieval re-implementation)

from negjax import evaluate  # noqa: E402
from negjax.data import negbench  # noqa: E402
from negjax.models import clip, weights  # noqa: E402
from negjax.reference import open_clip  # noqa: E402


def open_clip_evaluate(model, preprocess, tokenizer, files, data_root, batch_size):
  """The official-style evaluation, for timing and as a cross-check."""
  from PIL import Image
  results = {}

  def encode_images(paths):
    feats = []
    for start in range(0, len(paths), batch_size):
      batch = torch.stack([preprocess(Image.open(p)) for p in paths[start:start + batch_size]])
      feats.append(model.encode_image(batch))
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

  def encode_texts(texts):
    feats = [model.encode_text(tokenizer(texts[s:s + batch_size]))
             for s in range(0, len(texts), batch_size)]
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

  with torch.no_grad():
    for file in files:
      ds = negbench.read(file, data_root)
      stem = os.path.splitext(os.path.basename(file))[0]
      image = encode_images(ds.paths)
      if isinstance(ds, negbench.RetrievalSet):
        texts = [c for caps in ds.captions for c in caps]
        owner = torch.from_numpy(np.repeat(np.arange(len(ds.paths)),
                                           [len(c) for c in ds.captions]))
        results[stem] = metrics_bench.official_recall(encode_texts(texts), image, owner)
      else:
        n, o = len(ds.options), len(ds.options[0])
        options = encode_texts([t for row in ds.options for t in row]).reshape(n, o, -1)
        correct = {}
        for i in range(n):  # per-question bookkeeping, as the official loop
          t = int(ds.question_type[i])
          right = int((options[i] @ image[i]).argmax()) == int(ds.answer[i])
          correct.setdefault(t, []).append(right)
        results[stem] = {"total_accuracy": float(np.mean(sum(correct.values(), [])))}
  return results


def main():
  p = argparse.ArgumentParser()
  default_root = sorted(glob.glob(os.path.expanduser("~/.cache/negjax/shapes-*/eval")))
  p.add_argument("--data_root", default=default_root[0] if default_root else None)
  p.add_argument("--arch", default="ViT-B-32")
  p.add_argument("--batch_size", type=int, default=32)
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count())
  files = negbench.find_files(args.data_root)
  n_images = sum(len(negbench.read(f, args.data_root).paths) for f in files)
  print(f"{len(files)} files, {n_images} media items, {args.arch} (random weights), "
        f"batch {args.batch_size}")

  model = clip.create(clip.get_config(args.arch), seed=0)
  oc = open_clip()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "weights.safetensors")
    weights.save_open_clip(model, path)
    torch_model = oc.create_model(args.arch, pretrained=path).eval()
  preprocess = oc.image_transform(model.config.image_size, is_train=False)
  tokenizer = oc.get_tokenizer(args.arch)

  start = time.perf_counter()
  ours = evaluate.evaluate_files(model, files, args.data_root, args.batch_size, progress=False)
  t_ours = time.perf_counter() - start
  start = time.perf_counter()
  theirs = open_clip_evaluate(torch_model, preprocess, tokenizer, files, args.data_root,
                              args.batch_size)
  t_theirs = time.perf_counter() - start
  print(f"negjax:    {t_ours:6.1f} s  {n_images / t_ours:6.2f} images/s (includes compilation)")
  print(f"open_clip: {t_theirs:6.1f} s  {n_images / t_theirs:6.2f} images/s")
  print(f"ratio open_clip / negjax time: {t_theirs / t_ours:.2f}x")
  for stem in theirs:
    for key, value in theirs[stem].items():
      print(f"  {stem:35s} {key:28s} negjax {ours[stem][key]:.4f}  open_clip {value:.4f}")


if __name__ == "__main__":
  main()
