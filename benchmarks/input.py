"""Can the hosts feed the chips? Training-input samples/s per CPU core against the
compiled step's consumption.

  python benchmarks/input.py [--records 1024] [--aot benchmarks/aot.jsonl] [--mfu 0.4]

Measures the Grain training input exactly as the trainer builds it
(`train_input.make_iterator`, the paper preset's data settings: NegCap captions, the stored
4-option MCQ, 77-token texts) over ArrayRecord shards of 224 px images, in process:
record decode (proto + zlib) + per-example map + tokenisation of 1 caption and 4 options +
batching, as samples per CPU-second (a rate that other users of a shared machine do not
distort), in this one process (Grain workers off). Then, for each model and target with a
fitting point in benchmarks/aot.py's results (`negjax.compile`), the chip's consumption at
the predicted step time (per-device batch / step time at --mfu) and the host cores per chip
that 2x that consumption needs, against the vCPUs per chip of that machine's host
(`negjax.compile.CHIPS`). Records hold images at the model's size
(the data engine and `negjax.data.convert` resize once, at build time), so no resize runs
per step.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from negjax import compile as aot  # noqa: E402


def per_core_rate(n_records, batches, batch_size=32, train_dir=None):
  """(samples per CPU-second, samples/s wall) of the trainer's input at 224 px (records of
  another size are resized per example, as the trainer would)."""
  from absl import flags
  from negjax.data import make, train_input
  flags.FLAGS.mark_as_parsed()  # Grain reads its absl flags; this script has none
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "configs"))
  import negclip
  tmp = tempfile.mkdtemp()
  try:
    if train_dir is None:
      make.build(make.default_config("shapes", out=tmp, train_size=n_records, eval_size=0,
                                     image_size=224, shards=4, workers=1, progress=False))
      train_dir = os.path.join(tmp, "train")
    data = negclip.get_config("paper").data
    data.source = "records"  # NegFull records: each image with its caption and its MCQ
    data.workers = 0  # in this process, so its CPU time is all the input's work (the
    # preset's Grain workers would spend theirs outside process_time)
    it = train_input.make_iterator(train_dir, data, batch_size, 0, 224, process=(0, 1))
    next(it)  # opening, indexing
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
      batch = next(it)
    n = batches * batch_size
    assert batch["image"].shape == (batch_size, 224, 224, 3)
    assert batch["mcq_ids"].shape == (batch_size, 4, 77)
    return n / (time.process_time() - cpu), n / (time.perf_counter() - t)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--records", type=int, default=1024)
  ap.add_argument("--aot", default="benchmarks/aot.jsonl")
  ap.add_argument("--mfu", type=float, default=0.4)
  ap.add_argument("--train_dir", default=None, help="existing records (else 224 px shapes)")
  args = ap.parse_args()
  batches = max(2, args.records // 32 - 2)
  core, wall = per_core_rate(args.records, batches, train_dir=args.train_dir)
  print(f"training input (224 px, 1 caption + 4 options of 77 tokens): {core:.0f} samples "
        f"per CPU-second ({wall:.0f}/s wall on this machine)\n")
  if not os.path.exists(args.aot):
    print(f"no {args.aot}: run benchmarks/aot.py for the step times")
    return
  with open(args.aot) as f:
    points = [json.loads(l) for l in f]
  best = {}  # (arch, target) -> its largest fitting batch's figures; a chip's consumption
  # per second (per-device batch / step time) does not depend on the batch, remat or mesh
  for r in points:
    if r.get("fits") and "step_time_at_peak_s" in r:
      k = tuple(r["key"].split("|")[:2])
      if k not in best or r["batch_size"] > best[k]["batch_size"]:
        best[k] = r
  print(f"| model | target | largest fit | step at {args.mfu:.0%} MFU | samples/s per chip | "
        f"cores/chip for 2x | host cores/chip | ok |")
  print("|---|---|---|---|---|---|---|---|")
  for (arch, target), r in sorted(best.items()):
    step = r["step_time_at_peak_s"] / args.mfu
    per_chip = r.get("images_per_step", r["batch_size"]) / r["devices"] / step
    need = 2 * per_chip / core
    have = aot.CHIPS[r["chip"]]["host_cores_per_chip"]
    print(f"| {arch} | {target} | {r['batch_size']} | {step * 1e3:.0f} ms | {per_chip:.0f} | "
          f"{need:.1f} | {have} | {'yes' if need <= have else 'NO'} |")


if __name__ == "__main__":
  main()
