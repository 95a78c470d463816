"""negjax SigLIP against transformers' SiglipModel from the same random weights (Hugging Face
folder and big_vision .npz), its tokenizer against transformers' on a SentencePiece model
trained here, its image preprocessing, and the evaluator using both."""
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from negjax.models import siglip, weights

torch = pytest.importorskip("torch")
spm = pytest.importorskip("sentencepiece")

TOL = 1e-4  # max abs error in fp32, the bound
LENGTH = 16  # text positions of the tiny model (real SigLIPs: 64)
WORDS = ("a photo of the dog cat no not without never car street image picture man woman "
         "table chair red blue green big small person holding café Über naïve").split()


@pytest.fixture(scope="module")
def transformers():
  from negjax.reference import open_clip
  open_clip()  # declares the torchvision ops transformers' import needs in this venv
  import transformers
  return transformers


def train_spiece(folder, seed=0):
  """A small SentencePiece unigram model with SigLIP's special ids (pad 0, eos 1, unk 2)."""
  rng = random.Random(seed)
  corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
  corpus += ["Ünïcödé déjà vu 東京 日本語 🙂", "UPPER lower MiXeD 123 4.5"]
  text = os.path.join(folder, "corpus.txt")
  with open(text, "w") as f:
    f.write("\n".join(corpus))
  spm.SentencePieceTrainer.train(
      input=text, model_prefix=os.path.join(folder, "spiece"), vocab_size=200, pad_id=0,
      eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, model_type="unigram",
      hard_vocab_limit=False, minloglevel=2)
  os.remove(text)
  return os.path.join(folder, "spiece.model")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, transformers):
  """A random-init transformers SiglipModel (every tensor perturbed, so a misplaced
  parameter shows) saved with a SiglipTokenizer: (folder, model, tokenizer)."""
  folder = tmp_path_factory.mktemp("siglip")
  cfg = transformers.SiglipConfig(
      text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, vocab_size=200, max_position_embeddings=LENGTH,
                       pad_token_id=1, bos_token_id=None, eos_token_id=1),
      vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8))
  torch.manual_seed(0)
  model = transformers.SiglipModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.02)
  model.save_pretrained(folder)
  tok = transformers.SiglipTokenizer(vocab_file=train_spiece(str(tmp_path_factory.mktemp("sp"))),
                                     model_max_length=LENGTH)
  tok.save_pretrained(folder)
  return str(folder), model, tok


def reference(model, images, ids):
  with torch.no_grad():
    px, t_ids = torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(ids).long()
    img = model.get_image_features(pixel_values=px)
    txt = model.get_text_features(input_ids=t_ids)
    logits = model(input_ids=t_ids, pixel_values=px).logits_per_image
  img, txt = (getattr(x, "pooler_output", x).numpy() for x in (img, txt))
  return img, txt, logits.numpy()


def assert_matches(ours, ref, images, ids):
  img, txt, logits = ref
  errors = [np.abs(np.asarray(ours.encode_image(images)) - img).max(),
            np.abs(np.asarray(ours.encode_text(ids)) - txt).max(),
            np.abs(np.asarray(ours(images, ids)[0]) - logits).max()]
  print("max abs error (image, text, logits):", errors)
  assert max(errors) <= TOL, errors


def inputs(n=3, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, 32, 32, 3), np.float32),
          rng.integers(0, 200, (n, LENGTH)).astype(np.int32))


def test_hugging_face_folder_matches_transformers(hf_folder):
  folder, model, _ = hf_folder
  ours = weights.load_model(folder)
  assert isinstance(ours, siglip.SigLIP)
  assert ours.config.architecture["vision_mlp"] == 96 and ours.config.context_length == LENGTH
  images, ids = inputs()
  assert_matches(ours, reference(model, images, ids), images, ids)
  # export round trip: the same state dict back
  sd = siglip.state_dict(ours)
  theirs = {k: v.numpy() for k, v in model.state_dict().items() if "position_ids" not in k}
  assert sorted(sd) == sorted(theirs)
  for k in sd:
    np.testing.assert_allclose(sd[k], theirs[k], rtol=0, atol=1e-7, err_msg=k)


def to_big_vision(sd, heads, scanned=False):
  """The transformers state dict under big_vision's two-tower parameter names and layouts
  (written here from big_vision's module names, independently of negjax's reader)."""
  out = {}
  t = lambda x: np.ascontiguousarray(x.T)

  def mha(dst, q, k, v, qb, kb, vb, o, ob):
    width = q.shape[1]
    for name, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
      out[f"{dst}/{name}/kernel"] = t(w).reshape(width, heads, -1)
      out[f"{dst}/{name}/bias"] = b.reshape(heads, -1)
    out[f"{dst}/out/kernel"] = t(o).reshape(heads, -1, width)
    out[f"{dst}/out/bias"] = ob

  def block(src, dst):
    out[f"{dst}/LayerNorm_0/scale"], out[f"{dst}/LayerNorm_0/bias"] = (
        sd[f"{src}.layer_norm1.weight"], sd[f"{src}.layer_norm1.bias"])
    a = f"{src}.self_attn."
    mha(f"{dst}/MultiHeadDotProductAttention_0",
        *(sd[f"{a}{n}_proj.weight"] for n in "qkv"), *(sd[f"{a}{n}_proj.bias"] for n in "qkv"),
        sd[a + "out_proj.weight"], sd[a + "out_proj.bias"])
    out[f"{dst}/LayerNorm_1/scale"], out[f"{dst}/LayerNorm_1/bias"] = (
        sd[f"{src}.layer_norm2.weight"], sd[f"{src}.layer_norm2.bias"])
    for i in (0, 1):
      out[f"{dst}/MlpBlock_0/Dense_{i}/kernel"] = t(sd[f"{src}.mlp.fc{i + 1}.weight"])
      out[f"{dst}/MlpBlock_0/Dense_{i}/bias"] = sd[f"{src}.mlp.fc{i + 1}.bias"]

  def encoder(src, dst, layers):
    for i in range(layers):
      block(f"{src}.encoder.layers.{i}", f"{dst}/encoderblock_{i}")
    if scanned:
      for key in [k for k in out if f"{dst}/encoderblock_0/" in k]:
        name = key.split("/encoderblock_0/")[1]
        out[f"{dst}/encoderblock/{name}"] = np.stack(
            [out.pop(f"{dst}/encoderblock_{i}/{name}") for i in range(layers)])

  v, h = "vision_model.", "vision_model.head."
  out["img/embedding/kernel"] = sd[v + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)
  out["img/embedding/bias"] = sd[v + "embeddings.patch_embedding.bias"]
  out["img/pos_embedding"] = sd[v + "embeddings.position_embedding.weight"][None]
  encoder("vision_model", "img/Transformer", 2)
  out["img/Transformer/encoder_norm/scale"] = sd[v + "post_layernorm.weight"]
  out["img/Transformer/encoder_norm/bias"] = sd[v + "post_layernorm.bias"]
  out["img/MAPHead_0/probe"] = sd[h + "probe"]
  q, k, vv = np.split(sd[h + "attention.in_proj_weight"], 3)
  qb, kb, vb = np.split(sd[h + "attention.in_proj_bias"], 3)
  mha("img/MAPHead_0/MultiHeadDotProductAttention_0", q, k, vv, qb, kb, vb,
      sd[h + "attention.out_proj.weight"], sd[h + "attention.out_proj.bias"])
  out["img/MAPHead_0/LayerNorm_0/scale"] = sd[h + "layernorm.weight"]
  out["img/MAPHead_0/LayerNorm_0/bias"] = sd[h + "layernorm.bias"]
  for i in (0, 1):
    out[f"img/MAPHead_0/MlpBlock_0/Dense_{i}/kernel"] = t(sd[f"{h}mlp.fc{i + 1}.weight"])
    out[f"img/MAPHead_0/MlpBlock_0/Dense_{i}/bias"] = sd[f"{h}mlp.fc{i + 1}.bias"]
  out["txt/Embed_0/embedding"] = sd["text_model.embeddings.token_embedding.weight"]
  out["txt/pos_embedding"] = sd["text_model.embeddings.position_embedding.weight"][None]
  encoder("text_model", "txt/Encoder_0", 2)
  out["txt/Encoder_0/encoder_norm/scale"] = sd["text_model.final_layer_norm.weight"]
  out["txt/Encoder_0/encoder_norm/bias"] = sd["text_model.final_layer_norm.bias"]
  out["txt/head/kernel"] = t(sd["text_model.head.weight"])
  out["txt/head/bias"] = sd["text_model.head.bias"]
  out["t"], out["b"] = sd["logit_scale"], sd["logit_bias"]
  return {"params/" + k: v for k, v in out.items()}


@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision_npz_matches_transformers(hf_folder, tmp_path, scanned):
  folder, model, _ = hf_folder
  sd = {k: v.numpy() for k, v in model.state_dict().items() if "position_ids" not in k}
  path = str(tmp_path / "siglip.npz")
  np.savez(path, **to_big_vision(sd, heads=4, scanned=scanned))
  with pytest.raises(weights.CheckpointError, match="tokenizer file missing.*spiece.model"):
    weights.load_model(path, heads=(4, 4))
  shutil.copy(os.path.join(folder, "spiece.model"), tmp_path / "spiece.model")
  with pytest.raises(weights.CheckpointError, match="head count is unknown; pass heads="):
    weights.load_model(path)  # width 64 is no big_vision variant: an .npz cannot say
  ours = weights.load_model(path, heads=(4, 4))
  images, ids = inputs(seed=1)
  assert_matches(ours, reference(model, images, ids), images, ids)


def test_tokenizer_matches_transformers_on_1200_strings(hf_folder):
  _, _, hf = hf_folder
  rng = random.Random(1)
  chars = list("abcdefgh XYZ.,!?;:'\"()-_/\\@#  \t\néüß東🙂▁\u00a0")
  texts = []
  for i in range(1200):
    kind = i % 4
    if kind == 0:  # sentences of the vocabulary
      s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 8)))
    elif kind == 1:  # punctuation, case, whitespace, unicode, the SentencePiece "▁"
      s = "".join(rng.choice(chars) for _ in range(rng.randint(0, 30)))
    elif kind == 2:  # longer than the context: truncation keeps EOS last
      s = " ".join((rng.choice(WORDS).upper() if rng.random() < .3 else rng.choice(WORDS))
                   + rng.choice(",.!? ") for _ in range(rng.randint(10, 40)))
    else:
      s = rng.choice(["  A photo, of a DOG!  ", "no-dog", "", " ", "▁hello", "x'y", "ÜBER"]) \
          + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 5)))
    texts.append(s)
  ours = siglip.get_tokenizer(os.path.join(hf_folder[0], "spiece.model"), LENGTH)(texts)
  ref = hf(texts, padding="max_length", max_length=LENGTH, truncation=True)["input_ids"]
  agree = sum(list(a) == list(b) for a, b in zip(ours, ref))
  print(f"tokenizer: {agree} of {len(texts)} identical")
  assert any(len(hf(t)["input_ids"]) > LENGTH for t in texts)  # truncation is exercised
  assert agree == len(texts)


def test_folder_without_tokenizer_names_the_file(hf_folder, tmp_path):
  folder = tmp_path / "no_tokenizer"
  shutil.copytree(hf_folder[0], folder)
  os.remove(folder / "spiece.model")
  with pytest.raises(weights.CheckpointError) as e:
    weights.load_model(str(folder))
  assert str(folder / "spiece.model") in str(e.value) and "tokenizer.json" in str(e.value)
  # the evaluator's command line: one error line naming the file, exit status 2
  config = os.path.join(os.path.dirname(__file__), "..", "configs", "negbench.py")
  Image.new("RGB", (8, 8)).save(tmp_path / "0.png")  # inputs are checked before the model
  (tmp_path / "coco_val_mcq.csv").write_text(
      "image_path,caption_0,caption_1,correct_answer,correct_answer_template\n"
      "0.png,a dog,no dog,0,positive\n")
  r = subprocess.run([sys.executable, "-m", "negjax.evaluate", "--config", config,
                      f"--config.checkpoint={folder}", f"--config.data_root={tmp_path}",
                      f"--config.workdir={tmp_path / 'out'}"], capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1, r.stderr
  assert str(folder / "spiece.model") in errors[0]


def test_preprocess_matches_transformers(transformers, tmp_path):
  rng = np.random.default_rng(0)
  processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
  for shape in ((40, 57, 3), (64, 48, 4), (20, 20)):
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    ref = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(siglip.preprocess(image, 32), ref, rtol=0, atol=1e-5)


def test_evaluator_uses_the_models_tokenizer_and_preprocessing(hf_folder, tmp_path):
  from negjax import evaluate
  model = weights.load_model(hf_folder[0])
  enc = evaluate.Encoders(model)
  texts = ["a photo of a dog", "No cat, no car!", ""]
  feats = evaluate.encode_texts(enc, texts, batch_size=2)
  ids = hf_folder[2](texts, padding="max_length", max_length=LENGTH, truncation=True)["input_ids"]
  np.testing.assert_allclose(feats, np.asarray(model.encode_text(np.asarray(ids))), atol=1e-5)
  paths = []
  for i in range(3):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (30 + i, 45, 3), np.uint8)).save(
        paths[-1])
  image, ok, skipped = evaluate.encode_media(enc, paths, batch_size=2)
  assert ok.all() and not skipped
  want = model.encode_image(np.stack([siglip.preprocess(Image.open(p), 32) for p in paths]))
  np.testing.assert_allclose(image, np.asarray(want), atol=1e-5)


def save_gemma_tokenizer(transformers, folder, cls="GemmaTokenizer", seed=2):
  """A Gemma-style BPE (byte fallback, "▁" for spaces, 300 ids) trained here, saved in
  `folder` by transformers' class `cls` (tokenizer.json + tokenizer_config.json)."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
  rng = random.Random(seed)
  bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  bpe.normalizer = normalizers.Replace(" ", "▁")
  bpe.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
  bpe.train_from_iterator(
      [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(500)],
      trainers.BpeTrainer(vocab_size=300,
                          special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]))
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
            for m in json.loads(bpe.to_str())["model"]["merges"]]
  getattr(transformers, cls)(vocab=bpe.get_vocab(), merges=merges).save_pretrained(folder)
  return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("cls", ["GemmaTokenizer", "Siglip2Tokenizer"])
def test_tokenizer_json_matches_transformers(transformers, tmp_path, cls):
  """SigLIP 2's tokenizer file kind: a Gemma-style BPE trained here, saved by
  transformers' class, read back by both sides."""
  hf = save_gemma_tokenizer(transformers, tmp_path, cls)
  rng = random.Random(2)
  texts = ["", "  two  spaces ", "Café 東京 🙂", "A photo of a DOG, not a cat!"] + [
      " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(200)]
  ours = siglip.get_tokenizer(str(tmp_path / "tokenizer.json"), LENGTH)(texts)
  ref = hf(texts, padding="max_length", max_length=LENGTH, truncation=True)["input_ids"]
  assert [list(map(int, row)) for row in ours] == ref


def test_siglip2_fixed_resolution_folder_uses_its_tokenizer_json(hf_folder, tmp_path,
                                                                  transformers):
  """A fixed-resolution SigLIP 2 folder: a SiglipModel with tokenizer.json (Gemma's) in
  place of spiece.model; the model tokenizes with that file."""
  folder, model, _ = hf_folder
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(folder, name), tmp_path / name)
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  bpe = Tokenizer(models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = pre_tokenizers.Whitespace()
  bpe.train_from_iterator([" ".join(WORDS)] * 10, trainers.BpeTrainer(
      vocab_size=150, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
            for m in json.loads(bpe.to_str())["model"]["merges"]]
  transformers.GemmaTokenizer(vocab=bpe.get_vocab(), merges=merges).save_pretrained(tmp_path)
  ours = weights.load_model(str(tmp_path))
  assert ours.config.tokenizer_file == str(tmp_path / "tokenizer.json")
  texts = ["a photo of a dog", "no cat"]
  want = transformers.AutoTokenizer.from_pretrained(tmp_path)(
      texts, padding="max_length", max_length=LENGTH, truncation=True)["input_ids"]
  assert ours.tokenize(texts).tolist() == want
