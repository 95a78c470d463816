"""Fine-tuning a SigLIP folder with `negjax.train`: the model's own tokenizer at its full
context length, its pixel normalisation, no temperature clamp, and the exported Hugging Face
folder read back by negjax and transformers with the trained parameters' logits."""
import json
import math
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_shapes_world
from flax import nnx

from negjax import cli, evaluate, train, train_step
from negjax import image as clip_image
from negjax.data import records, train_input
from negjax.models import clip, siglip, weights
from test_siglip import LENGTH, hf_folder, transformers  # noqa: F401 (fixtures)

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tiny_shapes_world(tmp_path_factory, 32, 16, 2)


@pytest.fixture(scope="module")
def hot_folder(hf_folder, tmp_path_factory):  # noqa: F811
  """The transformers folder with exp(logit_scale) = 200 (released SigLIPs exceed CLIP's
  clamp at 100), written by `siglip.save_hf_folder`."""
  model = weights.load_model(hf_folder[0])
  model.logit_scale.set_value(jnp.asarray(math.log(200.0)))
  folder = str(tmp_path_factory.mktemp("hot") / "siglip")
  siglip.save_hf_folder(model, folder)
  return folder


def _config(workdir, data_dir, folder, **changes):
  return cli.load_config(os.path.join(ROOT, "configs", "negclip.py"), **{
      "workdir": workdir, "data.dir": data_dir, "model.init": folder, "total_steps": 3,
      "batch_size": 8, "log_every": 1, "checkpoint_every": 3, "optim.lr": 1e-3,
      "optim.warmup_steps": 1, "data.fresh_mcq": False, "data.mcq_answer_weights": None,
      "loss.distill": 0.0, "loss.distill_features": 0.0, "wise.alphas": (),
      "eval.batch_size": 16, **changes})


def _train_recording(config, monkeypatch):
  """Runs `train.train(config)`; returns the batches its step saw and the parameters of
  its last step (host copies)."""
  seen, last = [], {}
  make_step = train_step.make_train_step

  def recording(*args, **kw):
    step = make_step(*args, **kw)

    def run(state, batch):
      seen.append(jax.device_get(batch))
      state, metrics = step(state, batch)
      last["params"] = jax.tree.map(np.array, state["params"])
      return state, metrics
    return run
  monkeypatch.setattr(train_step, "make_train_step", recording)
  train.train(config)
  return seen, last["params"]


def _probe(n=4, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
          ["a red circle", "no blue square", "a photo of a green triangle", "not a star"][:n])


def _logits(model, images_uint8, texts):
  pixels = np.stack([siglip.preprocess(x, 32) for x in images_uint8])
  return np.asarray(model(pixels, model.tokenize(texts))[0])


def _transformers_logits(folder, transformers, images_uint8, texts):  # noqa: F811
  model = transformers.SiglipModel.from_pretrained(folder).eval()
  pixels = np.stack([siglip.preprocess(x, 32) for x in images_uint8])
  ids = siglip.get_tokenizer(siglip.find_tokenizer(folder), LENGTH)(texts)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
  return out.logits_per_image.numpy()


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_fine_tunes_a_siglip_folder_and_exports_one(kind, hot_folder, transformers, data_dir,  # noqa: F811
                                                    tmp_path, monkeypatch):
  folder = hot_folder
  initial = weights.load_model(folder)
  workdir = str(tmp_path / "run")
  # data.text_length (24 in the preset) differs from the model's 16: the model's is used.
  # The temperature is not trained (its learning rate 0): it stays above CLIP's clamp. The
  # softmax run distils the initial model on affirmative captions (the preset's weights).
  steps, evaluated = (3, True) if kind == "sigmoid" else (2, False)
  distill = 0.0 if kind == "sigmoid" else 1.0
  config = _config(workdir, data_dir, folder, **{
      "loss.kind": kind, "total_steps": steps, "checkpoint_every": steps,
      "eval.enabled": evaluated, "optim.frozen": "logit_scale", "loss.distill": distill,
      "loss.distill_features": distill})
  seen, trained = _train_recording(config, monkeypatch)
  assert len(seen) == steps
  assert float(trained["logit_scale"][...]) == pytest.approx(math.log(200.0), abs=1e-6)

  # the step's texts: the model's own tokenizer, untrimmed (its full context length)
  source = records.training_source(os.path.join(data_dir, "train"))
  rows = [source[i] for i in range(len(source))]
  captions = {tuple(r) for e in rows for pool in config.data.captions
              for r in initial.tokenize(list(e[pool]))}
  questions = {initial.tokenize(list(e["mcq_options"])).tobytes() for e in rows}
  retained = {tuple(r) for e in rows for r in initial.tokenize(list(e["affirmative"]))}
  for batch in seen:
    assert ("retain_ids" in batch) == bool(distill)
    assert all(tuple(r) in retained for r in batch.get("retain_ids", ()))
    assert batch["caption_ids"].shape == (8, LENGTH)
    assert batch["mcq_ids"].shape == (8, 4, LENGTH)
    assert all(tuple(r) in captions for r in batch["caption_ids"])
    assert all(q.astype(np.int32).tobytes() in questions for q in batch["mcq_ids"])

  # the export: a Hugging Face folder that negjax and transformers read, with the logits of
  # the parameters the last step returned
  export = os.path.join(workdir, "model")
  assert {"config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"} <= \
      set(os.listdir(export))
  images, texts = _probe()
  graphdef = nnx.graphdef(initial)
  ours = _logits(nnx.merge(graphdef, trained), images, texts)
  reloaded = _logits(weights.load_model(export), images, texts)
  theirs = _transformers_logits(export, transformers, images, texts)
  errors = (np.abs(reloaded - ours).max(), np.abs(theirs - ours).max())
  print(f"{kind}: export max abs logit error (negjax, transformers):", errors)
  assert max(errors) <= TOL, errors
  moved = np.abs(ours - _logits(initial, images, texts)).max()
  assert moved > 1e-3, moved  # training changed the model

  # the run's provenance and before-evaluation
  with open(os.path.join(workdir, "provenance.json")) as f:
    record = json.load(f)
  assert record["exported_model"]["path"] == export and record["exported_model"]["sha256"]
  assert record["architecture"] == siglip.architecture_name(initial.config)
  if not evaluated:
    return
  with open(os.path.join(workdir, "eval_before.json")) as f:
    before = json.load(f)
  files = [os.path.join(data_dir, "eval", f) for f in sorted(os.listdir(
      os.path.join(data_dir, "eval"))) if f.endswith(".csv")]
  direct = evaluate.evaluate_files(weights.load_model(folder), files=files,
                                   data_root=os.path.join(data_dir, "eval"), batch_size=16)
  assert set(before) == set(direct) and before
  for name in direct:
    for key, value in direct[name].items():
      if isinstance(value, float):
        assert before[name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_tokenizer_pickles_into_grain_workers(hot_folder):
  """Grain's worker processes get the training example by pickle: the SigLIP tokenizer goes
  as its file and length, and tokenizes there as the model does; CLIP's stays trimmable."""
  model = weights.load_model(hot_folder)
  tokenizer = train_input.tokenizer_for(model, 24)
  assert tokenizer == train_input.Tokenizer(LENGTH, model.config.tokenizer_file)
  assert not tokenizer.trims
  example = pickle.loads(pickle.dumps(train_input.TrainingExample(("negcap",), tokenizer, 32)))
  texts = ["a red circle but no blue square", "no star"]
  np.testing.assert_array_equal(example.tokenize(texts), model.tokenize(texts))
  tiny_clip = clip.CLIP(clip.get_config("negjax-tiny"), nnx.Rngs(0))
  assert train_input.tokenizer_for(tiny_clip, 24) == train_input.Tokenizer(24)
  assert train_input.Tokenizer(24).trims


def test_train_step_pixels_equal_the_evaluators_preprocessing(hf_folder):  # noqa: F811
  image = np.random.default_rng(3).integers(0, 256, (1, 32, 32, 3), np.uint8)
  for model, evaluator in ((weights.load_model(hf_folder[0]), siglip.preprocess),
                           (clip.CLIP(clip.get_config("negjax-tiny"), nnx.Rngs(0)),
                            clip_image.preprocess)):
    mean, std = train_step.pixel_normalization(model)
    ours = np.asarray(train_step.normalize_images(jnp.asarray(image), mean=mean, std=std))[0]
    error = np.abs(ours - evaluator(image[0], size=32)).max()
    print(type(model).__name__, "pixel max abs error:", error)
    assert error <= 1e-6, (type(model).__name__, error)


def test_clamp_leaves_siglip_temperatures_above_100_and_clamps_clips():
  for model, expected in ((siglip.create(siglip.ARCHITECTURES["siglip-tiny"]), 200.0),
                          (clip.CLIP(clip.get_config("negjax-tiny"), nnx.Rngs(0)), 100.0)):
    model.logit_scale.set_value(jnp.asarray(math.log(200.0)))
    params = train_step.clamp_logit_scale(nnx.state(model, nnx.Param))
    assert math.exp(float(params["logit_scale"][...])) == pytest.approx(expected, rel=1e-6)


def test_naflex_and_compile_refuse_siglip_clearly(tmp_path, monkeypatch):
  naflex = siglip.ARCHITECTURES["siglip-tiny"].replace(max_num_patches=16, position_grid=4)
  model = nnx.eval_shape(lambda: siglip.SigLIP(naflex.replace(
      image_size=siglip.sheet_side(16, naflex.patch_size))))
  monkeypatch.setattr(weights, "load_model", lambda *args, **kw: model)  # a NaFlex folder
  config = cli.load_config(os.path.join(ROOT, "configs", "negclip.py"),
                           **{"model.init": str(tmp_path / "naflex")})
  with pytest.raises(cli.UserError, match="NaFlex SigLIP 2 .* square images"):
    train.load_initial_model(config.model)
  with pytest.raises(siglip.SigLIPError, match="NaFlex"):
    siglip.save_hf_folder(model, str(tmp_path / "out"))
  from negjax import compile as compile_
  config = cli.load_config(os.path.join(ROOT, "configs", "negclip.py"),
                           **{"model.arch": "siglip-base-patch16-224"})
  with pytest.raises(cli.UserError, match="CLIP training steps only"):
    compile_.abstract_model(config)
