"""The training records as a TFDS `GeneratorBasedBuilder`, for TFDS-native workflows.

`negjax.data.make` is the main path (parallel, byte-identical for any worker count). This
builder produces the same examples through TFDS's own writer, which shuffles records by
key and runs in one process. It needs no TensorFlow: the features avoid
`tfds.features.Image`, whose encoder imports TF.

  builder = NegationData(data_dir=DIR, config=builder_config(make.default_config(...)))
  builder.download_and_prepare()
  source = builder.as_data_source()["train"]   # random access, for Grain
"""
import dataclasses

import tensorflow_datasets as tfds

from negjax.data import make
from negjax.data import records


@dataclasses.dataclass(kw_only=True)
class NegationConfig(tfds.core.BuilderConfig):
  data: dict = dataclasses.field(default_factory=dict)  # a make.default_config as a dict


def builder_config(data_config, name=None):
  """Wraps a data config; the default name carries its `make.fingerprint` (settings and
  engine version), so TFDS keeps each differently made build in its own directory."""
  c = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
  c = {k: v for k, v in c.items() if k not in ("out", "workers", "progress", "shards")}
  return NegationConfig(name=name or f"{c['name']}_{make.fingerprint(c)}", data=c)


class NegationData(tfds.core.GeneratorBasedBuilder):
  """NegCap / NegMCQ / affirmative captions per image (schema: negjax.data.records)."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"2.0.0": "exclusive NegCap templates name every present object "
                            "(make.ENGINE_VERSION 2)"}
  # No checksums/README files to find beside the code. Looking them up would import
  # `importlib_resources`, which TFDS uses without declaring it as a dependency.
  code_path = None
  BUILDER_CONFIGS = [builder_config(make.default_config("shapes"), name="shapes")]

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", records.FORMAT)
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=records.features())

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    config = make.default_config(self.builder_config.data["source"])
    config.update(self.builder_config.data)
    train, val, _ = make.sources(config)
    splits = {}
    for name, source, split in (("train", train, make.TRAIN), ("validation", val, make.EVAL)):
      if source is not None and len(source):
        splits[name] = self._generate_examples(make._examples(config, source, split))
    return splits

  def _generate_examples(self, examples):
    for index in range(len(examples.source)):
      try:
        example, _ = examples(index)
      except records.Skip:
        continue  # listed by `negjax.data.make`; here only left out
      yield index, example
