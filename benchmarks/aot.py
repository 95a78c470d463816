"""The memory/fit table: which CLIP fits which slice at which global batch.

  python benchmarks/aot.py --out /tmp/aot.jsonl            # compile the grid (slow: minutes each)
  python benchmarks/aot.py --out /tmp/aot.jsonl --table    # the README table from what is there

For each (architecture, target, remat, mesh) it looks for the largest global batch in
1k..32k that fits, by bisection (a batch that fits means every smaller one does), each
point one `python -m negjax.compile` in its own process (`configs/negclip.py:paper` on
NegFull records: bf16, 77-token texts, each image with its caption and a 4-option MCQ,
scanned layers so compile time does not grow with
depth, the evaluator not compiled). Results are appended to --out as JSON lines as they
come, so an interrupted run keeps what it measured and a rerun skips it; a point whose
compile ran past --timeout is no answer and is compiled again by the next run (the last line
of a key wins). The grid runs target by target (all models on v5e-256 first). GPU targets
need the CUDA plugin and a target spec (`negjax.compile --gpu`); without them they are
listed as not measured.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile

ARCHS = ("ViT-B-16", "ViT-L-14", "ViT-H-14")
TARGETS = {"v5e-256": "v5e:16x16", "v5p-128": "v5p:4x4x4", "v6e-256": "v6e:16x16",
           "8xH200": "gpu:h200:8"}
GPU_TARGETS = [t for t, topology in TARGETS.items() if topology.startswith("gpu:")]
BATCHES = (1024, 2048, 4096, 8192, 16384, 32768)
MESHES = {"fsdp": ("1", "-1"), "dp": ("-1", "1")}  # (mesh.data, mesh.fsdp)
# The GPU rows use negjax's default attention (cuDNN, odd token counts padded to even:
# layers.attention). Rows compiled with another attention (the table's first 8xH200 rows
# used XLA's, before that padding) are stale: kept in the file, not used, compiled again.
GPU_ATTENTION = "auto"
GiB = 1 << 30


def key(arch, target, remat, mesh, batch):
  return f"{arch}|{target}|remat={int(remat)}|{mesh}|{batch}"


def compile_point(arch, target, remat, mesh, batch, timeout, gpu_spec=None,
                  gpu_python=None):
  """One `negjax.compile` run -> its JSON figures (or {"error": ...})."""
  topology = TARGETS[target]
  data, fsdp = MESHES[mesh]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "r.json")
    cmd = [sys.executable, "-m", "negjax.compile", "--config", "configs/negclip.py:paper",
           f"--config.model.arch={arch}", "--config.model.dtype=bfloat16",
           "--config.model.scan_layers=True", f"--config.model.remat={remat}",
           f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
           f"--config.batch_size={batch}", "--config.data.source=records", "--noeval",
           "--json", out]
    env = dict(os.environ)
    if topology.startswith("gpu:"):
      _, chip, gpus = topology.split(":")
      cmd[0] = gpu_python or sys.executable
      cmd += ["--gpu", chip, "--gpus", gpus, "--gpu_target_config", gpu_spec,
              f"--attention={GPU_ATTENTION}"]
      env["JAX_PLATFORMS"] = "cpu"  # the CUDA plugin's compile-only topology, no GPU
      # deviceless: no autotuning, and Triton GEMM tiles picked without it fail to compile
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false")
    else:
      cmd += ["--topology", topology]
    try:
      p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
      return {"error": f"compile took over {timeout} s"}
    if p.returncode or not os.path.exists(out):
      lines = [l for l in p.stderr.splitlines() if "rror" in l] or p.stderr.splitlines()[-1:]
      return {"error": (lines[-1] if lines else f"exit {p.returncode}")[:300]}
    with open(out) as f:
      return json.load(f)


def stale(r) -> bool:
  """A GPU answer compiled with another attention than GPU_ATTENTION (none said: XLA's)."""
  return r["key"].split("|")[1] in GPU_TARGETS and r.get("attention", "xla") != GPU_ATTENTION


def timed_out(r) -> bool:
  return "took over" in r.get("error", "")


def load(path):
  """key -> its last result line (a retried point's newest answer)."""
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if not stale(r):
          done[r["key"]] = r
  return done


def largest_fit(results, arch, target, remat, mesh):
  """(largest measured batch that fits, smallest that does not)."""
  fit = [b for b in BATCHES if results.get(key(arch, target, remat, mesh, b), {}).get("fits")]
  nofit = [b for b in BATCHES if results.get(key(arch, target, remat, mesh, b), {}).get(
      "fits") is False]
  return (max(fit) if fit else None), (min(nofit) if nofit else None)


def search(results, args, arch, target, remat, mesh, write):
  """Bisection over BATCHES for the largest that fits; measured points are reused."""
  lo, hi = -1, len(BATCHES)  # BATCHES[lo] fits, BATCHES[hi] does not
  while hi - lo > 1:
    mid = (lo + hi) // 2
    k = key(arch, target, remat, mesh, BATCHES[mid])
    if k not in results or timed_out(results[k]):  # a timeout is retried, not an answer
      print(f"compiling {k}", flush=True)
      r = compile_point(arch, target, remat, mesh, BATCHES[mid], args.timeout, args.gpu_spec,
                        args.gpu_python)
      r["key"] = k
      if target in GPU_TARGETS:  # (an error has no "attention" of its own)
        r.setdefault("attention", GPU_ATTENTION)
      results[k] = r
      write(r)
      print(f"  -> fits={r.get('fits')} peak={r.get('peak_bytes')} {r.get('error', '')}",
            flush=True)
    fits = results[k].get("fits")
    if fits is None:  # an error that is not out-of-memory: nothing to bisect on
      return
    lo, hi = (mid, hi) if fits else (lo, mid)


def table(results) -> str:
  """Markdown: one row per (target, arch, remat, mesh) of the grid: the largest global batch
  that fits, the per-device peak and temporaries there, and the peak at each measured batch."""
  head = ("| target | model | remat | mesh | largest fit | peak there | temp there | "
          + " | ".join(f"{b // 1024}k" for b in BATCHES) + " |")
  lines = [head, "|" + "---|" * (7 + len(BATCHES))]
  gib = lambda x: f"{x / GiB:.1f}" if x else "?"
  for target, arch, remat, mesh in itertools.product(TARGETS, ARCHS, (False, True), MESHES):
    cells, any_answer = [], False
    for b in BATCHES:
      r = results.get(key(arch, target, remat, mesh, b))
      if r is None:
        cells.append("")
      elif r.get("fits") is None:  # not an answer: a compile timeout or another error
        cells.append("timeout" if timed_out(r) else "error")
      else:
        any_answer = True
        peak = r.get("peak_bytes") or r.get("temp_bytes")
        cells.append(gib(peak) + ("" if r["fits"] else " OOM"))
    best, worst = largest_fit(results, arch, target, remat, mesh)
    if not any_answer:
      fit = "not measured" if not any(cells) else "no answer"
    elif best is None:
      fit = f"< {worst}"
    elif best == BATCHES[-1]:
      fit = f"{best}+"  # the grid's largest
    elif worst == BATCHES[BATCHES.index(best) + 1]:
      fit = f"{best}"  # the next batch is refused
    else:
      fit = f"{best} to < {worst}" if worst else f">= {best}"
    at = results[key(arch, target, remat, mesh, best)] if best else {}
    lines.append(f"| {target} | {arch} | {'on' if remat else 'off'} | {mesh} | {fit} | "
                 f"{gib(at.get('peak_bytes')) if at else ''} | "
                 f"{gib(at.get('temp_bytes')) if at else ''} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="benchmarks/aot.jsonl")
  ap.add_argument("--table", action="store_true", help="print the table only")
  ap.add_argument("--archs", default=",".join(ARCHS))
  ap.add_argument("--targets", default=",".join(TARGETS))
  ap.add_argument("--remat", default="1,0")
  ap.add_argument("--meshes", default="fsdp,dp")
  ap.add_argument("--timeout", type=int, default=1200)
  ap.add_argument("--gpu_spec", default=None, help="GpuTargetConfigProto text for H200")
  ap.add_argument("--gpu_python", default=None,
                  help="python of an environment with negjax[gpu] (the CUDA plugin)")
  args = ap.parse_args()
  results = load(args.out)
  if not args.table:
    with open(args.out, "a") as f:
      def write(r):
        f.write(json.dumps(r) + "\n")
        f.flush()
      for target, arch, remat, mesh in itertools.product(
          args.targets.split(","), args.archs.split(","),
          [bool(int(x)) for x in args.remat.split(",")], args.meshes.split(",")):
        if TARGETS[target].startswith("gpu:") and not args.gpu_spec:
          print(f"{target}: not measured (needs --gpu_spec and the CUDA plugin)")
          continue
        search(results, args, arch, target, remat, mesh, write)
  print("Per-device GiB. largest fit: the largest global batch of the grid that compiles "
        "within HBM (\"A to < B\": B refused, between not measured); peak / temp there: the "
        "compiler's peak and temporaries at it; batch columns: the peak at that batch; OOM: "
        "on TPU the temporaries the compiler asked for when it refused the program, on GPU "
        "the compiled peak over HBM; timeout: no answer within --timeout; blank: not "
        "compiled.\n")
  print(table(results))


if __name__ == "__main__":
  main()
