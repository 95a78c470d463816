"""NaFlex SigLIP 2 (transformers' Siglip2Model) against transformers from the same random
weights: preprocessing against Siglip2ImageProcessor on images of several aspect ratios,
image / text features and logits, and the evaluator reading such a folder; the same weights
as a big_vision NaFlex .npz (proj.image_text.naflex_vit names and layouts)."""
import json
import math
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

from negjax.models import siglip, weights
from test_siglip import TOL, save_gemma_tokenizer, to_big_vision, transformers  # noqa: F401

torch = pytest.importorskip("torch")

PATCH, SLOTS, LENGTH = 4, 24, 16  # patch side, max_num_patches, text positions
# (height, width): landscape, portrait, square, tiny (upsampled), extreme (1-patch rows)
SHAPES = ((40, 57), (64, 20), (30, 30), (7, 11), (12, 300))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, transformers):
  """A random-init Siglip2Model (every tensor perturbed, so a misplaced parameter shows;
  a 4 x 4 position grid), its processor with max_num_patches=24 and a Gemma-style
  tokenizer, saved with save_pretrained: (folder, model, image processor, tokenizer)."""
  folder = tmp_path_factory.mktemp("siglip2")
  cfg = transformers.Siglip2Config(
      text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, vocab_size=300, max_position_embeddings=LENGTH),
      vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_patches=16, patch_size=PATCH))
  torch.manual_seed(0)
  model = transformers.Siglip2Model(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.02)
  model.save_pretrained(folder)
  processor = transformers.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=SLOTS)
  processor.save_pretrained(folder)
  tokenizer = save_gemma_tokenizer(transformers, folder)
  return str(folder), model, processor, tokenizer


def images():
  rng = np.random.default_rng(0)
  return [Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8)) for shape in SHAPES]


def test_preprocessing_matches_siglip2_image_processor(folder, transformers):
  _, _, processor, _ = folder
  ours = siglip.NaFlexPreprocess(PATCH, SLOTS)
  side = siglip.sheet_side(SLOTS, PATCH)
  fast = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=SLOTS)
  grids, fast_error = set(), 0.0
  for image in images():
    ref = processor(image, return_tensors="np")
    grid = tuple(int(x) for x in ref["spatial_shapes"][0])
    grids.add(grid)
    patches, got = siglip.from_sheet(ours(image, size=side)[None], SLOTS, PATCH)
    assert tuple(np.asarray(got[0])) == grid
    assert ref["pixel_attention_mask"][0].sum() == grid[0] * grid[1]
    np.testing.assert_allclose(np.asarray(patches[0]), ref["pixel_values"][0], rtol=0, atol=1e-5)
    # the torchvision processor resizes with its own (antialiased bilinear) kernel
    tv = fast(image, return_tensors="np")
    assert tuple(tv["spatial_shapes"][0]) == grid
    fast_error = max(fast_error, np.abs(np.asarray(patches[0]) - tv["pixel_values"][0]).max())
  print(f"patch grids {sorted(grids)}; max abs difference to the torchvision processor "
        f"{fast_error:.4f} (2/255 = {2 / 255:.4f} is one uint8 level)")
  assert len({g[0] / g[1] for g in grids}) >= 4  # several aspect ratios, grids up and down
  assert fast_error <= 2 / 255 + 1e-6


TEXTS = ["a photo of a dog", "no cat, no car", "", "big red chair without a table"]


def reference(folder, side):
  """transformers' processor and Siglip2Model on images() and TEXTS: (patch sheets of its
  own patches, token ids, image features, text features, logits per image)."""
  _, model, processor, tokenizer = folder
  ref = processor(images(), return_tensors="np")
  ids = np.asarray(tokenizer(TEXTS, padding="max_length", max_length=LENGTH,
                             truncation=True)["input_ids"])
  with torch.no_grad():
    pixels = {k: torch.from_numpy(np.asarray(ref[k])) for k in
              ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
    t_ids = torch.from_numpy(ids).long()
    img = model.get_image_features(**pixels).pooler_output.numpy()
    txt = model.get_text_features(input_ids=t_ids).pooler_output.numpy()
    logits = model(input_ids=t_ids, **pixels).logits_per_image.numpy()
  sheets = np.stack([siglip.to_sheet(p, g, side)
                     for p, g in zip(ref["pixel_values"], ref["spatial_shapes"])])
  return sheets, ids, img, txt, logits


def test_folder_matches_transformers(folder):
  path, model, processor, tokenizer = folder
  ours = weights.load_model(path)
  c = ours.config
  assert (c.max_num_patches, c.position_grid, c.image_size) == (SLOTS, 4, siglip.sheet_side(
      SLOTS, PATCH))
  from negjax import evaluate
  enc = evaluate.Encoders(ours)  # the evaluator's jitted towers
  # transformers' own patches, packed into sheets: the model alone
  sheets, ids, img, txt, logits = reference(folder, c.image_size)
  assert ours.tokenize(TEXTS).tolist() == ids.tolist()
  ref = processor(images(), return_tensors="np")
  # negjax's preprocessing: the whole image path
  own = np.stack([ours.image_transforms[0](image, size=c.image_size) for image in images()])
  errors = {"image": np.abs(np.asarray(enc.image(sheets)) - img).max(),
            "image (own preprocessing)": np.abs(np.asarray(enc.image(own)) - img).max(),
            "text": np.abs(np.asarray(enc.text(ids)) - txt).max(),
            "logits": np.abs(np.asarray(ours(sheets, ids)[0]) - logits).max()}
  print("max abs error:", errors)
  assert max(errors.values()) <= TOL, errors
  # a padding patch changes nothing: the mask, not zero pixels, keeps it out
  noisy = sheets.copy().reshape(len(sheets), -1)
  for row, (h, w) in enumerate(ref["spatial_shapes"]):
    start = h * w * PATCH * PATCH * 3
    noisy[row, start:SLOTS * PATCH * PATCH * 3] = 5.0
  np.testing.assert_allclose(np.asarray(enc.image(noisy.reshape(sheets.shape))),
                             np.asarray(enc.image(sheets)), rtol=0, atol=1e-6)
  # a plain image is not a patch sheet: refused, not read as one
  with pytest.raises(ValueError, match="image 1 is not a NaFlex patch sheet"):
    ours.encode_image(np.concatenate([sheets[:1], np.ones_like(sheets[:1])]))
  # export round trip: transformers' state dict back
  sd = siglip.state_dict(ours)
  theirs = {k: v.numpy() for k, v in model.state_dict().items() if "position_ids" not in k}
  assert sorted(sd) == sorted(theirs)
  for k in sd:
    np.testing.assert_allclose(sd[k], theirs[k], rtol=0, atol=1e-7, err_msg=k)


def test_evaluator_reads_files_of_any_aspect_ratio(folder, tmp_path):
  from negjax import evaluate
  model = weights.load_model(folder[0])
  paths = []
  for i, image in enumerate(images()):
    paths.append(str(tmp_path / f"{i}.png"))
    image.save(paths[-1])
  feats, ok, skipped = evaluate.encode_media(evaluate.Encoders(model), paths, batch_size=2)
  assert ok.all() and not skipped
  want = model.encode_image(np.stack([model.image_transforms[0](Image.open(p),
                                                                 size=model.config.image_size)
                                      for p in paths]))
  np.testing.assert_allclose(feats, np.asarray(want), rtol=0, atol=1e-5)


def test_bad_naflex_config_is_refused(folder, tmp_path):
  for name in os.listdir(folder[0]):
    os.symlink(os.path.join(folder[0], name), tmp_path / name)
  os.remove(tmp_path / "config.json")
  cfg = json.load(open(os.path.join(folder[0], "config.json")))
  cfg["vision_config"]["num_patches"] = 12
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(weights.CheckpointError, match="num_patches 12 is not a square"):
    weights.load_model(str(tmp_path))
  cfg["vision_config"]["num_patches"] = 16
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  os.remove(tmp_path / "preprocessor_config.json")
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_num_patches": 0}))
  with pytest.raises(weights.CheckpointError, match="max_num_patches 0 is not a positive"):
    weights.load_model(str(tmp_path))


def to_big_vision_naflex(sd, heads):
  """transformers' Siglip2Model state dict under big_vision's names and layouts for a two-tower
  with a proj.image_text.naflex_vit image tower: test_siglip.to_big_vision's, except the
  patch embedding, naflex_vit's Dense "embedding" [p * p * 3, width] over patches flattened
  (row, col, channel) as ops_naflex's patchify (tf.image.extract_patches), and the position
  table, "pos_embedding" [G, G, width]."""
  e = "vision_model.embeddings."
  linear, table = sd[e + "patch_embedding.weight"], sd[e + "position_embedding.weight"]
  out = to_big_vision({**sd, e + "patch_embedding.weight": np.zeros((1, 1, 1, 1))}, heads)
  out["params/img/embedding/kernel"] = np.ascontiguousarray(linear.T)
  g = math.isqrt(len(table))
  out["params/img/pos_embedding"] = table.reshape(g, g, -1)
  return out


@pytest.fixture(scope="module")
def naflex_npz(folder, tmp_path_factory):
  """The folder's weights as a big_vision NaFlex .npz (tokenizer files beside it)."""
  path, model, _, _ = folder
  sd = {k: v.numpy() for k, v in model.state_dict().items() if "position_ids" not in k}
  out = tmp_path_factory.mktemp("bv_naflex")
  for name in os.listdir(path):
    if name.startswith("tokenizer") or name == "special_tokens_map.json":
      os.symlink(os.path.join(path, name), out / name)
  npz = str(out / "siglip2_naflex.npz")
  np.savez(npz, **to_big_vision_naflex(sd, heads=4))
  return npz


def test_big_vision_naflex_npz_matches_transformers(folder, naflex_npz):
  with pytest.raises(weights.CheckpointError,
                     match=re.escape(naflex_npz) + ".*max_num_patches.*must be stated"):
    weights.load_model(naflex_npz, heads=(4, 4))
  ours = weights.load_model(naflex_npz, heads=(4, 4), max_num_patches=SLOTS)
  c = ours.config
  # the model the Hugging Face folder of the same weights gives
  _, hf = siglip._hf_config(os.path.join(folder[0], "config.json"))
  assert c.architecture == hf.architecture
  # the command lines' form (`FILE=naflex:24`, `--config.arch=naflex:24`) is the same model
  assert weights.load_model(naflex_npz, "naflex:24", heads=(4, 4)).config == c
  with pytest.raises(weights.CheckpointError, match="naflex:25.*max_num_patches=24 differ"):
    weights.load_model(naflex_npz, "naflex:25", heads=(4, 4), max_num_patches=SLOTS)
  sheets, ids, img, txt, logits = reference(folder, c.image_size)
  grids = {tuple(g) for g in np.asarray(siglip.from_sheet(sheets, SLOTS, PATCH)[1]).tolist()}
  assert len(grids) >= 2
  assert ours.tokenize(TEXTS).tolist() == ids.tolist()
  errors = {"image": np.abs(np.asarray(ours.encode_image(sheets)) - img).max(),
            "text": np.abs(np.asarray(ours.encode_text(ids)) - txt).max(),
            "logits": np.abs(np.asarray(ours(sheets, ids)[0]) - logits).max()}
  print(f"patch grids {sorted(grids)}; max abs error:", errors)
  assert max(errors.values()) <= TOL, errors


def test_bad_big_vision_naflex_npz_is_refused(folder, naflex_npz, tmp_path):
  params = dict(np.load(naflex_npz))
  bad = str(tmp_path / "bad.npz")
  with pytest.raises(weights.CheckpointError, match="max_num_patches 0 is not a positive"):
    weights.load_model(naflex_npz, heads=(4, 4), max_num_patches=0)
  kernel, pos = "params/img/embedding/kernel", "params/img/pos_embedding"
  fixed = {kernel: params[kernel].reshape(PATCH, PATCH, 3, -1), pos: params[pos].reshape(1, 16, -1)}
  np.savez(bad, **{**params, **fixed})  # a fixed-resolution file: a conv, [1, N, w] positions
  with pytest.raises(weights.CheckpointError,
                     match=re.escape(bad) + ": max_num_patches=24 given, but .*fixed-res"):
    weights.load_model(bad, heads=(4, 4), max_num_patches=SLOTS)
  with pytest.raises(weights.CheckpointError, match="heads=/max_num_patches= outside .npz"):
    weights.load_model(folder[0], max_num_patches=SLOTS)  # its preprocessor_config.json says
  np.savez(bad, **{**params, pos: params[pos].reshape(2, 8, -1)})
  with pytest.raises(weights.CheckpointError,
                     match=re.escape(bad) + r".*img/pos_embedding \(2, 8, 64\) is not a square"):
    weights.load_model(bad, heads=(4, 4), max_num_patches=SLOTS)
  np.savez(bad, **{k: v for k, v in params.items() if k != "params/img/embedding/bias"})
  with pytest.raises(weights.CheckpointError,
                     match=re.escape(bad) + ".*missing big_vision parameter 'img/embedding/bias'"):
    weights.load_model(bad, heads=(4, 4), max_num_patches=SLOTS)
  np.savez(bad, **params, **{"img/embedding/bias": params["params/img/embedding/bias"]})
  with pytest.raises(weights.CheckpointError, match=re.escape(bad) + ".*both with and without"):
    weights.load_model(bad, heads=(4, 4), max_num_patches=SLOTS)
  with open(naflex_npz, "rb") as f:
    head = f.read(os.path.getsize(naflex_npz) // 2)
  with open(bad, "wb") as f:
    f.write(head)
  with pytest.raises(weights.CheckpointError, match=re.escape(bad) + ": not a readable .npz"):
    weights.load_model(bad, heads=(4, 4), max_num_patches=SLOTS)


def test_position_resize_is_big_vision_s():
  """naflex_vit._pos_emb_resize (jax.image.scale_and_translate, bilinear with antialias, of the
  [G, G, w] table to an l x l canvas at scale grid / G, read at each patch's (row, col), l = 64
  as in learn_2d) gives the numbers of resize_positions (transformers' interpolation), so
  big_vision NaFlex files run as they were trained; grids smaller and larger than G = 4."""
  table = np.random.default_rng(0).normal(size=(4, 4, 8)).astype(np.float32)
  grids = np.asarray([(1, 24), (3, 7), (4, 4), (6, 4), (1, 1), (9, 2)])
  got = np.asarray(siglip.resize_positions(table.reshape(16, 8), grids, SLOTS))
  for i, (h, w) in enumerate(grids):
    canvas = jax.image.scale_and_translate(table, (64, 64, 8), (0, 1), np.asarray([h, w]) / 4,
                                           np.zeros(2), "bilinear", antialias=True)
    want = np.asarray(canvas)[:h, :w].reshape(h * w, 8)
    np.testing.assert_allclose(got[i, :h * w], want, rtol=0, atol=1e-5, err_msg=f"{(h, w)}")
