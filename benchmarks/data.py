"""Generation rates of the data engine, conversion and training input on this machine.

  python benchmarks/data.py [--images 1000] [--records 4000] [--workers 1,2]
                            [--photos 1024] [--beam-workers 2] [--skip-engine]

Measures shapes rendering (images/s), the caption engine (images/s), record encoding,
shard writing through `records.write_split` with each worker count (examples/s, including
process start-up, and CPU-ms per example: with k idle cores, k workers reach about
k * 1000 / CPU-ms examples/s), and random-access reading through `records.training_source`.

Then, on `--photos` synthetic photos (JPEG, 512x384, ~img2dataset's size) stored three ways
(a TAB caption CSV + JPEG folder, WebDataset tars, and negjax.data.convert's ArrayRecord
shards of 224 px JPEGs): the Beam conversion's records/s per core (DirectRunner with
`--beam-workers` processes; per core = records per CPU-second of the driver and its
workers), and the training input's samples/s per core (`train_input.make_iterator`, in
process, batches of 32 at 224 px) for each of them and for the shapes demo's records
(64 px), plus the wall time of a 10M-image conversion on `--cluster-cores` cores.
"""
import argparse
import io
import os
import resource
import shutil
import tempfile
import time

from negjax import cli
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
  parser.add_argument("--photos", type=int, default=1024, help="0: skip the input benchmark")
  parser.add_argument("--beam-workers", type=int, default=2)
  parser.add_argument("--cluster-cores", type=int, default=256)
  parser.add_argument("--skip-engine", action="store_true")
  args = parser.parse_args()
  if not args.skip_engine:
    engine(args)
  if args.photos:
    inputs(args)


def engine(args):
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


def write_photos(root, n, tars):
  """n synthetic photos as a caption CSV + JPEG folder and as img2dataset-style tars."""
  import csv
  import tarfile
  import numpy as np
  from PIL import Image
  os.makedirs(os.path.join(root, "imgs"))
  os.makedirs(os.path.join(root, "wds"))
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:384, 0:512]
  rows, per_tar = [], -(-n // tars)
  for t in range(tars):
    with tarfile.open(os.path.join(root, "wds", f"{t:05d}.tar"), "w") as tar:
      for i in range(t * per_tar, min(n, (t + 1) * per_tar)):
        base = np.stack([(x * (i % 7 + 1) // 8) % 256, (y * (i % 5 + 1) // 6) % 256,
                         ((x + y) // 4 + 17 * i) % 256], -1)
        photo = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(photo).save(out, "JPEG", quality=90)
        data, caption = out.getvalue(), f"a photo of a dog and a cup, number {i}".encode()
        with open(os.path.join(root, "imgs", f"{i:06d}.jpg"), "wb") as f:
          f.write(data)
        rows.append([f"imgs/{i:06d}.jpg", caption.decode()])
        for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.txt", caption)):
          info = tarfile.TarInfo(name)
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))
  with open(os.path.join(root, "pairs.tsv"), "w", newline="") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(["filepath", "title"])
    w.writerows(rows)
  return os.path.join(root, "wds", "{00000..%05d}.tar" % (tars - 1))


def input_rate(config, image_size, batches, batch_size=32):
  """(samples/s wall, samples per CPU-second of this process) of the training input."""
  from negjax.data import train_input
  it = train_input.make_iterator(config.get("train_dir"), config, batch_size, 0, image_size,
                                 process=(0, 1))
  next(it)  # opening, indexing
  t, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  n = batches * batch_size
  return n / (time.perf_counter() - t), n / (time.process_time() - cpu)


def inputs(args):
  import ml_collections
  from negjax.data import convert
  tmp = tempfile.mkdtemp()
  os.environ.setdefault("NEGJAX_CACHE", os.path.join(tmp, "cache"))
  try:
    n = args.photos
    pattern = write_photos(tmp, n, max(2, args.beam_workers * 4))
    photo_mb = sum(os.path.getsize(os.path.join(tmp, "imgs", f)) for f in
                   os.listdir(os.path.join(tmp, "imgs"))) / n / 1e3
    print(f"\n{n} photos, 512x384 JPEG, {photo_mb:.0f} kB each")
    spec = {"source": "webdataset", "input": pattern, "image_size": 224, "workers":
            args.beam_workers, "name": "pairs"}
    config = convert_config(spec)
    per_core = {}
    for runner in ("local", "DirectRunner"):
      config.runner, config.out = runner, os.path.join(tmp, f"converted-{runner}")
      cpu0, t = cpu_seconds(), time.perf_counter()
      summary = convert.build(config)
      wall, cpu = time.perf_counter() - t, cpu_seconds() - cpu0
      made = sum(summary["records"].values())
      per_core[runner] = made / cpu
      label = "1 process, no Beam" if runner == "local" else f"{args.beam_workers} workers"
      print(f"conversion {runner:12s} {made / wall:7.0f} records/s wall, "
            f"{made / cpu:6.0f} records/s per core ({label}, {made} records)")
    # Beam's per-core rate here carries its start-up (worker processes, gRPC) over only n
    # records; on 10M records a worker's steady rate approaches the one-process rate.
    hours = [10e6 / (per_core[r] * args.cluster_cores) / 3600 for r in ("DirectRunner", "local")]
    print(f"10M images on {args.cluster_cores} cores (e.g. Dataflow, 32 x n2-standard-8): "
          f"{hours[0]:.2f} h at the Beam rate measured here, {hours[1]:.2f} h at the steady "
          f"one-process rate (local disk I/O included; a bucket's read/write bandwidth is not)")
    batches = max(2, n // 32 - 1)
    cfg = lambda **kw: ml_collections.ConfigDict({"text_length": 77, "workers": 0, **kw})
    sources = {
        "ArrayRecord (converted, 224 px JPEG)": cfg(source="converted",
                                                     dir=config.out, mcq_csv=""),
        "WebDataset tars (512x384 JPEG)": cfg(source="webdataset", shards=pattern,
                                              mcq_csv=""),
        "CSV + JPEG folder (512x384 JPEG)": cfg(source="official_csv",
                                                caption_csv=os.path.join(tmp, "pairs.tsv"),
                                                mcq_csv=""),
    }
    print("training input, in process, batches of 32 at 224 px:")
    for name, c in sources.items():
      wall, core = input_rate(c, 224, batches)
      print(f"  {name:38s} {wall:7.0f} samples/s wall, {core:6.0f} per core")
    shapes_dir = os.path.join(tmp, "shapes")
    make.build(make.default_config("shapes", out=shapes_dir, train_size=2000, eval_size=0,
                                   shards=4, workers=1, progress=False))
    demo = cfg(source="records", train_dir=os.path.join(shapes_dir, "train"),
               captions=("negcap", "affirmative"), fresh_mcq=True,
               mcq_answer_weights=(1.0, 3.0, 1.0), text_length=24)
    wall, core = input_rate(demo, 64, batches)
    print(f"  {'records (shapes demo, 64 px, fresh MCQ)':38s} {wall:7.0f} samples/s wall, "
          f"{core:6.0f} per core")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def convert_config(overrides):
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "data", "convert.py")
  return cli.load_config(path, **overrides)


if __name__ == "__main__":
  main()
