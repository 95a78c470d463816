"""Generation rates of the data engine on this machine.

  python benchmarks/data.py [--images 1000] [--records 4000] [--workers 1,2]

Measures shapes rendering (images/s), the caption engine (images/s), record encoding,
shard writing through `records.write_split` with each worker count (examples/s, including
process start-up, and CPU-ms per example: with k idle cores, k workers reach about
k * 1000 / CPU-ms examples/s), and random-access reading through `records.training_source`.
"""
import argparse
import os
import resource
import shutil
import tempfile
import time

from negjax.data import captions
from negjax.data import make
from negjax.data import records
from negjax.data import shapes


def rate(n, fn):
  t = time.perf_counter()
  fn()
  return n / (time.perf_counter() - t)


def cpu_seconds():
  """CPU time of this process and its finished children: a rate that other users of a
  shared machine do not distort (wall-clock scaling needs idle cores)."""
  own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                   resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--records", type=int, default=4000)
  parser.add_argument("--workers", default="1,2")
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--shards", type=int, default=16)
  args = parser.parse_args()
  n, size = args.images, args.size
  print(f"cpus: {os.cpu_count()}, image size {size}")

  scenes = []
  r = rate(n, lambda: scenes.extend(shapes.sample_scene(shapes.scene_rng(0, 0, i))
                                    for i in range(n)))
  print(f"scene sampling        {r:9.0f} scenes/s")
  r = rate(n, lambda: [shapes.render(s, size) for s in scenes])
  print(f"rendering             {r:9.0f} images/s")
  objs = [([o.name for o in s.objects], s.absent) for s in scenes]
  r = rate(n, lambda: [captions.annotate(p, a, captions.caption_rng(0, 0, i))
                       for i, (p, a) in enumerate(objs)])
  print(f"caption engine        {r:9.0f} images/s")
  config = make.default_config("shapes", image_size=size)
  train, _, _ = make.sources(make.default_config("shapes", train_size=args.records))
  examples = make._examples(config, train, make.TRAIN)
  made = [examples(i)[0] for i in range(200)]
  records.encode(made[0])  # warm the feature spec
  r = rate(200, lambda: [records.encode(e) for e in made])
  print(f"record encoding       {r:9.0f} examples/s")
  r = rate(200, lambda: [records.encode(examples(i)[0]) for i in range(200)])
  print(f"example, end to end   {r:9.0f} examples/s")

  tmp = tempfile.mkdtemp()
  try:
    for w in (int(x) for x in args.workers.split(",")):
      out = os.path.join(tmp, f"w{w}")
      cpu0 = cpu_seconds()
      r = rate(args.records, lambda: records.write_split(
          examples, args.records, out, "shapes", "train", args.shards, w, progress=False))
      cpu = (cpu_seconds() - cpu0) / args.records * 1e3
      print(f"shard writing, {w} worker{'s' if w > 1 else ' '}  {r:7.0f} examples/s, "
            f"{cpu:.2f} CPU-ms/example ({args.records} records, {args.shards} shards)")
    source = records.training_source(out)
    m = min(len(source), 2000)
    r = rate(m, lambda: [source[(i * 7919) % len(source)] for i in range(m)])
    print(f"reading (Grain source) {r:8.0f} examples/s")
  finally:
    shutil.rmtree(tmp)


if __name__ == "__main__":
  main()
