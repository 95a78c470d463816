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


def plot_run(workdir: str, before: dict, after: dict, sweep: dict | None = None,
             chosen: float | None = None) -> str:
  """WORKDIR/training.png: loss terms and learning rate; before/after bars of the negation
  numbers and, in their own panel, of the retention numbers (nothing hidden); with a WiSE-FT
  `sweep` ({alpha: summary}) the exported mix's bars too and the negation-vs-retention
  frontier, one point per alpha (see negjax.retention)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from negjax import retention

  records = [r for r in read_records(workdir) if "loss" in r]
  fig, axes = plt.subplots(2, 3, figsize=(16, 9))
  axes = axes.ravel()
  for name in ("loss", "contrastive_loss", "mcq_loss", "l2_to_init", "distill",
               "distill_features"):  # the retention terms unweighted, as the step logs them
    pts = [(r["step"], r[name]) for r in records if name in r]
    if pts:
      axes[0].plot(*zip(*pts), label=name)
  axes[0].set(title="loss", xlabel="step")
  axes[0].legend()
  pts = [(r["step"], r["lr"]) for r in records if "lr" in r]
  if pts:
    axes[1].plot(*zip(*pts))
  axes[1].set(title="learning rate", xlabel="step")

  bars = [("before", before), ("fine-tuned", after)]
  if sweep and chosen is not None and chosen != 1.0 and chosen in sweep:
    bars.append((f"exported (alpha={chosen:g})", sweep[chosen]))
  negation = [k for k in retention.NEGATION_KEYS + ("hybrid_accuracy", "total_accuracy")
              if k in before or k in after]
  kept = [k for k in retention.RETENTION_KEYS + ("positive_accuracy",)
          if k in before or k in after]
  for ax, keys, title in ((axes[3], negation, "negation"),
                          (axes[4], kept, "retention (affirmative captions, zero-shot)")):
    x, width = np.arange(len(keys)), 0.8 / len(bars)
    for i, (label, values) in enumerate(bars):
      ax.bar(x + (i - (len(bars) - 1) / 2) * width, [values.get(k, np.nan) for k in keys],
             width, label=label)
    ax.set_xticks(x, keys, rotation=20, ha="right", fontsize=8)
    ax.set(title=title, ylim=(0, 1))
    ax.legend(fontsize=8)

  ax = axes[2]
  if sweep:
    alphas = sorted(sweep)
    loss = [retention.retention_loss(before, sweep[a]) for a in alphas]
    score = [retention.negation_score(sweep[a]) for a in alphas]
    ax.plot(loss, score, "o-")
    for a, x, y in zip(alphas, loss, score):
      ax.annotate(f"{a:g}" + (" (exported)" if a == chosen else ""), (x, y), fontsize=8,
                  xytext=(4, 4), textcoords="offset points")
    ax.set(title="WiSE-FT frontier (labels: alpha)", xlabel="retention loss (largest drop)",
           ylabel="negation score (mean of " + ", ".join(retention.NEGATION_KEYS) + ")")
    ax.yaxis.label.set_fontsize(8)
  else:
    ax.set_axis_off()
  axes[5].set_axis_off()
  fig.tight_layout()
  path = os.path.join(workdir, "training.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
