"""What a training run tells its user: a console line per log step, a progress bar,
metrics as JSON lines in the workdir, and a PNG of the curves at the end."""
import json
import os
import time

import numpy as np
from tqdm import tqdm

from negjax import atomic


class RunLog:
  """Console + `workdir/metrics.jsonl`. Each record carries the step.

  A run resumed from step S keeps the records up to S and drops later ones (the work after
  the checkpoint, which is being redone), so no step is logged twice; a run from step 0
  starts an empty log."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    if enabled and os.path.exists(self.path):
      kept = [r for r in read_records(workdir) if start_step and r["step"] <= start_step]
      atomic.write(self.path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept))
    self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                    dynamic_ncols=True, disable=not enabled)

  def write(self, step: int, **metrics) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({k: _plain(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def console(self, text: str) -> None:
    if self.enabled:
      self.bar.write(text)

  def advance(self, steps: int = 1) -> None:
    self.bar.update(steps)

  def close(self) -> None:
    self.bar.close()


def _plain(v):
  if isinstance(v, dict):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  if hasattr(v, "item") and np.ndim(v) == 0:
    return v.item()
  return v


def read_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut short by a kill
        pass
  return out


def plot_run(workdir: str, before: dict, after: dict, keys: list[str]) -> str:
  """Training curves (loss terms, lr) and a before/after bar chart of `keys`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = [r for r in read_records(workdir) if "loss" in r]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for name in ("loss", "contrastive_loss", "mcq_loss"):
    pts = [(r["step"], r[name]) for r in records if name in r]
    if pts:
      axes[0].plot(*zip(*pts), label=name)
  axes[0].set(title="loss", xlabel="step")
  axes[0].legend()
  pts = [(r["step"], r["lr"]) for r in records if "lr" in r]
  if pts:
    axes[1].plot(*zip(*pts))
  axes[1].set(title="learning rate", xlabel="step")
  x = np.arange(len(keys))
  axes[2].bar(x - 0.2, [before.get(k, np.nan) for k in keys], 0.4, label="before")
  axes[2].bar(x + 0.2, [after.get(k, np.nan) for k in keys], 0.4, label="after")
  axes[2].set_xticks(x, keys, rotation=30, ha="right", fontsize=8)
  axes[2].set(title="negation metrics", ylim=(0, 1))
  axes[2].legend()
  fig.tight_layout()
  path = os.path.join(workdir, "training.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
