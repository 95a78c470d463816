"""Keeping what the model knew while it learns negation.

Fine-tuning a CLIP on negated captions lifts negation and lowers plain retrieval and
zero-shot accuracy. Four levers, each a config option of `negjax.train`:

  * WiSE-FT (Wortsman et al. 2022): the weights (1 - alpha) * initial + alpha * fine-tuned.
    After training the trainer evaluates a sweep of alphas (`wise.alphas`), draws the
    negation-vs-retention frontier, and exports one alpha (`export_mix`: a number, or
    "auto": the best negation score whose retention loss is within `wise.max_retention_loss`).
  * an L2-to-init penalty on the towers during training (`loss.l2_init`, see `l2_to_init`).
  * distillation from the frozen initial model on affirmative captions (learning without
    forgetting; `loss.distill`, `loss.distill_features`, see `distill_terms`): each training
    row also carries one caption of `data.retain_pool`, and the student keeps the teacher's
    image<->caption similarities over the batch and/or its feature directions.
  * per-tower learning rates / freezing by parameter-name regex (`optim.lr_mults`,
    `optim.frozen`, see `negjax.train_step.make_optimizer`).

Headline numbers (`negjax.train.summary`): negation is the negation-template MCQ accuracy and
negated-query Recall@5; retention is plain retrieval Recall@5 both ways and zero-shot top-1.
The retention loss of a model is its largest drop, over the retention numbers, below the
initial model's.
"""
import jax
import jax.numpy as jnp
import numpy as np

from negjax import losses

NEGATION_KEYS = ("negative_accuracy", "negated_retrieval_recall@5")
RETENTION_KEYS = ("plain_image_retrieval_recall@5", "plain_text_retrieval_recall@5",
                  "zero_shot_top1")


def mix(initial, finetuned, alpha: float):
  """WiSE-FT: (1 - alpha) * initial + alpha * finetuned, leaf by leaf (float32)."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"mixing coefficient must be in [0, 1], got {alpha}")
  return jax.tree.map(
      lambda a, b: ((1.0 - alpha) * np.asarray(a, np.float32)
                    + alpha * np.asarray(b, np.float32)).astype(np.asarray(b).dtype),
      initial, finetuned)


def retention_loss(before: dict, summary: dict) -> float:
  """The largest drop below `before` over the retention numbers both summaries have
  (0 when none dropped); nan when they share none."""
  drops = [before[k] - summary[k] for k in RETENTION_KEYS if k in before and k in summary]
  return max(max(drops), 0.0) if drops else float("nan")


def negation_score(summary: dict) -> float:
  """Mean of the negation numbers the summary has (nan when it has none)."""
  values = [summary[k] for k in NEGATION_KEYS if k in summary]
  return float(np.mean(values)) if values else float("nan")


def choose(sweep: dict, before: dict, max_retention_loss: float) -> float:
  """The alpha of `sweep` ({alpha: summary}) with the best negation score among those whose
  retention loss is at most `max_retention_loss`; ties go to the smaller alpha (closer to
  the initial model). None qualifies only if even alpha=0 fails: then the smallest alpha."""
  within = [a for a, s in sweep.items()
            if not retention_loss(before, s) > max_retention_loss + 1e-9]
  if not within:
    return min(sweep)
  return max(within, key=lambda a: (negation_score(sweep[a]), -a))


def parse_mix(value) -> float | str:
  """`export_mix` as given on the command line: "auto" or a number in [0, 1]."""
  if isinstance(value, str) and value.strip() == "auto":
    return "auto"
  alpha = float(value)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"must be 'auto' or a number in [0, 1], got {value!r}")
  return alpha


DISTILL_KEYS = ("distill", "distill_features")  # loss weights of distill_terms
RETAIN_POOLS = ("affirmative", "negcap")  # caption pools of a record (negjax.data.records)


def weight(loss_config, key) -> float:
  """A retention loss weight of the config (unset or None: 0)."""
  return float(loss_config.get(key, 0.0) or 0.0)


def distills(loss_config) -> bool:
  """Whether training rows must carry a retention caption (`retain_ids`)."""
  return any(weight(loss_config, k) for k in DISTILL_KEYS)


def needs_initial(loss_config) -> bool:
  """Whether the step needs the initial parameters (the L2 anchor or the teacher)."""
  return bool(weight(loss_config, "l2_init")) or distills(loss_config)


def check_config(config) -> list[str]:
  """Problems of the distillation options (empty: none): weights >= 0, a known caption
  pool, and records input (the two-stream sources have no affirmative captions)."""
  problems = []
  for key in DISTILL_KEYS:
    value = config.loss.get(key, 0.0)
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and np.isfinite(value) and value >= 0):
      problems.append(f"loss.{key} must be a finite number >= 0, got {value!r}")
  if not problems and distills(config.loss):
    pool = config.data.get("retain_pool", "")
    if pool not in RETAIN_POOLS:
      problems.append(f"data.retain_pool must be one of {', '.join(RETAIN_POOLS)} when "
                      f"loss.distill or loss.distill_features > 0, got {pool!r}")
    if config.data.get("source", "records") != "records":
      problems.append(f"loss.distill / distill_features need data.source=records (rows with "
                      f"affirmative captions), got {config.data.source!r}: set "
                      f"--config.loss.distill=0 --config.loss.distill_features=0")
  return problems



def distill_terms(student, teacher, student_images, pixels, retain_ids):
  """The distillation terms of one batch: {"distill": KL of the image<->caption softmax
  (losses.distill_loss), "distill_features": squared distance of the normalised image and
  caption features, averaged over the two}. `teacher`: the initial model, whose forward
  passes take no gradient; `student_images`: the student's features of `pixels`."""
  teacher_images = jax.lax.stop_gradient(teacher.encode_image(pixels))
  teacher_texts = jax.lax.stop_gradient(teacher.encode_text(retain_ids))
  student_texts = student.encode_text(retain_ids)
  scale = jax.lax.stop_gradient(teacher.temperature())
  return {"distill": losses.distill_loss(student_images, student_texts, teacher_images,
                                         teacher_texts, scale),
          "distill_features": 0.5 * (losses.feature_distance(student_images, teacher_images)
                                     + losses.feature_distance(student_texts, teacher_texts))}


def l2_to_init(params, initial):
  """Sum over the towers' weights of the squared distance to the initial weights (the
  temperature is left free)."""
  def sq(path, p, p0):
    if any(getattr(k, "key", None) == "logit_scale" for k in path):
      return jnp.zeros((), jnp.float32)
    return jnp.sum(jnp.square(p.astype(jnp.float32) - p0.astype(jnp.float32)))
  return sum(jax.tree.leaves(jax.tree_util.tree_map_with_path(sq, params, initial)))


def frontier_table(before: dict, sweep: dict, chosen: float | None = None) -> str:
  """One line per alpha: negation and retention numbers, score and retention loss."""
  keys = [k for k in NEGATION_KEYS + RETENTION_KEYS + ("positive_accuracy",)
          if any(k in s for s in sweep.values())]
  short = {"negative_accuracy": "neg MCQ", "negated_retrieval_recall@5": "neg R@5",
           "plain_image_retrieval_recall@5": "img R@5",
           "plain_text_retrieval_recall@5": "txt R@5",
           "zero_shot_top1": "0-shot", "positive_accuracy": "aff MCQ"}
  lines = ["alpha  " + " ".join(f"{short[k]:>8s}" for k in keys) + "  ret.loss  chosen"]
  for alpha in sorted(sweep):
    s = sweep[alpha]
    lines.append(f"{alpha:5.2f}  " + " ".join(f"{s.get(k, float('nan')):8.3f}" for k in keys)
                 + f"  {retention_loss(before, s):8.3f}  {'<-' if alpha == chosen else ''}")
  return "\n".join(lines)
