"""NegBench evaluation of a CLIP checkpoint.

  python -m negjax.evaluate --config configs/negbench.py \
      --config.checkpoint=ViT-B-32.pt --config.data_root=/data/negbench \
      --config.workdir=/runs/eval-vitb32 [--config.files=COCO_val_mcq_llama3.1_rephrased.csv,...]

Without `files`, every NegBench CSV under `data_root` is evaluated (recognised by its
columns); relative media paths in the CSVs are taken from `data_root`. Every CSV is read and
checked before anything is encoded. Writes, after each file, WORKDIR/results.json
(provenance, and per file: accuracies or Recall@1/5/10, skipped media, confusion table),
WORKDIR/results.csv (official names, e.g. coco-negated-image_retrieval_recall@5, plus
per-file counts such as coco-negated-num_skipped) and WORKDIR/mcq_accuracy.png; rerun the
same command after an interruption and the files already done are not evaluated again.
For OpenAI ViT-B/32 expect COCO MCQ total accuracy 0.393 (positive 0.691, negative 0.068,
hybrid 0.393) and VOC2007 0.387. On this 2-core CPU a ViT-B/32 encodes about 10 images/s,
so the 5k-image COCO files take minutes each.

Leaderboard (several models, same files):

  python -m negjax.evaluate --config configs/negbench.py --config.data_root=/data/negbench \
      --config.checkpoints=openai:ViT-B-32,shapes,/runs/negclip/model.safetensors=ViT-B-32 \
      --config.workdir=/runs/leaderboard

Each entry is NAME[=ARCH]. Writes WORKDIR/leaderboard.csv and .md (a row per model, the
official metric names as columns, an `error` column: a model that cannot be loaded or
evaluated is reported there, the others still run), leaderboard_mcq.png (MCQ accuracy per
template type: Affirmation / Negation / Hybrid) and leaderboard_retrieval.png (Recall@5 on
original vs negated queries); each model's own results.json/csv in WORKDIR/models/NAME-HASH/.
Adding a model to the list and rerunning evaluates only that model. Models of one image size
share each file's image decoding. The packaged `shapes` model on the shapes eval files
scores near 1.0 Recall@5 on affirmative queries, lower on negated ones, and below chance on
negated MCQ questions.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.checkpoint = ""  # any file negjax.load_model reads (OpenAI .pt, open_clip, HF, Orbax)
  c.arch = ""  # e.g. "ViT-B-32-quickgelu" when the file does not record it
  # A leaderboard instead of `checkpoint`: comma-separated NAME[=ARCH] entries (openai:ARCH,
  # shapes, a file or folder), each evaluated into WORKDIR/models/ (negjax.leaderboard).
  c.checkpoints = ""
  c.files = ""  # comma-separated CSVs; empty: all NegBench files under data_root
  c.data_root = ""  # where relative media paths (and relative `files`) start
  c.workdir = "negbench_eval"
  c.batch_size = 64
  c.dtype = "float32"  # compute dtype, e.g. bfloat16 on accelerators
  c.workers = 0  # Grain worker processes decoding images (0: in the main process)
  # Retrieval ties (equal scores): "official" as the published numbers, "optimistic"
  # (ties go to the query) or "pessimistic" (against it). See negjax.metrics.
  c.tie_rule = "official"
  # A file with more unreadable media than this share is an error (skipped items would
  # shrink the denominators); a file with none readable always is.
  c.max_skipped_fraction = 0.01
  # How texts are scored: "plain" (CLIP), or "decompose": a text the caption grammar reads
  # as "A but not N" scores sim(A) - alpha * sim(N), others plainly (negjax.search.baselines).
  # Run once per baseline (each into its own workdir) to compare them with fine-tuning.
  c.baseline = "plain"
  c.alpha = 1.0
  return c
