"""WebDataset tars or the official NegBench CSVs -> ArrayRecord shards, on Apache Beam.

  # img2dataset output (CC3M / CC12M / LAION): one output shard per tar
  python -m negjax.data.convert --config configs/data/convert.py \\
      --config.source=webdataset --config.input='/data/cc12m/{00000..01242}.tar' \\
      --config.out=/data/cc12m-224 --config.workers=16

  # the released CC12M-NegCap (TAB, filepath/caption) + CC12M-NegMCQ CSVs
  python -m negjax.data.convert --config configs/data/convert.py \\
      --config.source=official_csv --config.input=/data/negcap.csv \\
      --config.caption_column=caption --config.mcq_input=/data/negmcq.csv \\
      --config.out=/data/negfull-224

  # the same pipeline on Dataflow (Flink / Spark: FlinkRunner / SparkRunner + their flags)
  python -m negjax.data.convert --config configs/data/convert.py ... \\
      --config.runner=DataflowRunner --config.beam_options="--project=P --region=R \\
      --temp_location=gs://B/tmp --num_workers=32 --requirements_file=requirements.txt"

Prints record counts per split and the skipped records (unreadable images, bad rows, tar
samples without image or caption), all listed in OUT/summary.json. `--config.runner=local`
runs the same conversion in one process without Beam (identical output). Needs
`pip install 'negjax[beam]'` for the Beam runners. Train on the output with
`--config.data.source=converted --config.data.dir=OUT`.
"""
import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
  c = ml_collections.ConfigDict()
  c.source = "webdataset"  # or "official_csv"
  c.input = ""  # webdataset: brace pattern of tars; official_csv: the caption CSV (or "")
  c.mcq_input = ""  # official_csv: the MCQ CSV (or "")
  c.out = ""  # required: output folder
  c.name = "pairs"  # shard file prefix
  c.image_size = 224  # stored square side: the model's input size
  c.rows_per_shard = 10_000  # official_csv: rows per output shard
  c.image_column, c.caption_column, c.separator = "filepath", "title", "\t"  # caption CSV
  c.image_root = placeholder(str)  # relative image paths: None = the CSV's folder
  c.runner = "DirectRunner"  # "local" (no Beam), DirectRunner, DataflowRunner, FlinkRunner...
  c.workers = 0  # DirectRunner worker processes; 0: one per CPU
  c.beam_options = ""  # extra Beam pipeline flags for other runners
  return c
