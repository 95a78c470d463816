"""Reading and writing CLIP weights: OpenAI `.pt`, open_clip state dicts and safetensors,
Hugging Face CLIPModel folders, and negjax's own Orbax checkpoints.

Every format is first brought to one canonical form — open_clip's state-dict names with
NumPy values — and only then mapped onto the NNX model. torch is imported only to read
pickled `.pt`/`.bin` files, and then with `weights_only=True` so a file cannot run code.
"""
import json
import logging
import os
import re
import tempfile
import urllib.request
import zipfile
import hashlib
import difflib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from negjax.models import clip

log = logging.getLogger(__name__)

CONFIG_KEY = "negjax_config"  # safetensors metadata / Orbax side file holding the architecture
ORBAX_CONFIG_FILE = "negjax_config.json"
CACHE_DIR = os.path.expanduser(os.environ.get("NEGJAX_CACHE", "~/.cache/negjax"))

# OpenAI's releases; the folder in each URL is the file's SHA-256.
OPENAI_URLS = {
    "ViT-B-32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B-16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L-14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L-14-336": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
# Entries of OpenAI's archives that are not weights.
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; the message names the file and the key."""


# ---------------------------------------------------------------------------------------
# Canonical (open_clip) names <-> model parameters.
# ---------------------------------------------------------------------------------------

_BLOCK = [  # (model path inside a block, open_clip suffix, torch->ours transform)
    (("ln_1", "scale"), "ln_1.weight", None), (("ln_1", "bias"), "ln_1.bias", None),
    (("qkv", "kernel"), "attn.in_proj_weight", "T"), (("qkv", "bias"), "attn.in_proj_bias", None),
    (("out", "kernel"), "attn.out_proj.weight", "T"), (("out", "bias"), "attn.out_proj.bias", None),
    (("ln_2", "scale"), "ln_2.weight", None), (("ln_2", "bias"), "ln_2.bias", None),
    (("fc", "kernel"), "mlp.c_fc.weight", "T"), (("fc", "bias"), "mlp.c_fc.bias", None),
    (("proj", "kernel"), "mlp.c_proj.weight", "T"), (("proj", "bias"), "mlp.c_proj.bias", None),
]


def _param_table(config: clip.CLIPConfig):
  """[(model path, open_clip key or per-layer keys, transform)] for every parameter."""
  table = [
      (("visual", "patch_embed"), "visual.conv1.weight", "conv"),
      (("visual", "class_embedding"), "visual.class_embedding", None),
      (("visual", "positional_embedding"), "visual.positional_embedding", None),
      (("visual", "ln_pre", "scale"), "visual.ln_pre.weight", None),
      (("visual", "ln_pre", "bias"), "visual.ln_pre.bias", None),
      (("visual", "ln_post", "scale"), "visual.ln_post.weight", None),
      (("visual", "ln_post", "bias"), "visual.ln_post.bias", None),
      (("visual", "proj"), "visual.proj", None),
      (("text", "token_embedding"), "token_embedding.weight", None),
      (("text", "positional_embedding"), "positional_embedding", None),
      (("text", "ln_final", "scale"), "ln_final.weight", None),
      (("text", "ln_final", "bias"), "ln_final.bias", None),
      (("text", "text_projection"), "text_projection", None),
      (("logit_scale",), "logit_scale", None),
  ]
  for tower, prefix, layers in (("visual", "visual.transformer.resblocks", config.vision_layers),
                                ("text", "transformer.resblocks", config.text_layers)):
    for path, suffix, transform in _BLOCK:
      keys = [f"{prefix}.{i}.{suffix}" for i in range(layers)]
      table.append(((tower, "transformer", "blocks") + path, keys, transform))
  return table


def _to_ours(x, transform, patch=None):
  if transform == "T":
    return x.T
  if transform == "conv":  # [width, 3, p, p] -> [(p, p, 3), width]
    return x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0])
  return x


def _to_torch(x, transform, patch=None):
  if transform == "T":
    return x.T
  if transform == "conv":
    return x.reshape(patch, patch, 3, -1).transpose(3, 2, 0, 1)
  return x


def _get_path(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def state_dict(model: clip.CLIP) -> dict[str, np.ndarray]:
  """The model's parameters under open_clip's names and layouts (float32 NumPy)."""
  params = nnx.state(model, nnx.Param)
  out = {}
  for path, keys, transform in _param_table(model.config):
    value = np.asarray(_get_path(params, path)[...], np.float32)
    if isinstance(keys, list):
      for i, key in enumerate(keys):
        out[key] = np.array(_to_torch(value[i], transform, model.config.patch_size), order="C")
    else:
      out[keys] = np.array(_to_torch(value, transform, model.config.patch_size), order="C")
  return out


def from_state_dict(sd: dict, config: clip.CLIPConfig, source: str = "<state dict>"):
  """Builds a model from an open_clip state dict; every key must be used, every shape right."""
  model = nnx.eval_shape(lambda: clip.CLIP(config, nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  used = set()

  def fetch(key, expected, transform):
    if key not in sd:
      raise CheckpointError(f"{source}: missing key {key!r}")
    value = _to_ours(np.asarray(sd[key]), transform)
    if value.shape != expected:
      raise CheckpointError(f"{source}: key {key!r} has shape {np.shape(sd[key])}, "
                            f"which does not fit {expected} for this architecture")
    used.add(key)
    return value

  for path, keys, transform in _param_table(config):
    var = _get_path(params, path)
    shape = tuple(var.shape)
    if isinstance(keys, list):
      value = np.stack([fetch(k, shape[1:], transform) for k in keys])
    else:
      value = fetch(keys, shape, transform)
    var.set_value(jnp.asarray(value, config.param_dtype))
  extra = sorted(set(sd) - used - set(_OPENAI_EXTRAS) - {"attn_mask"})
  if extra:
    raise CheckpointError(f"{source}: unexpected keys for {_describe(config)}: "
                          f"{extra[:8]}{' …' if len(extra) > 8 else ''}")
  nnx.update(model, params)
  return model


def _describe(config):
  return clip.architecture_name(config) or f"architecture {config.architecture}"


def infer_shapes(sd: dict, source: str = "<state dict>") -> dict:
  """The `clip.weight_shapes` fields of an open_clip state dict, read from its tensors.
  The head counts and the activation are not among them: no shape shows those."""
  def shape(key):
    if key not in sd:
      raise CheckpointError(f"{source}: missing key {key!r}; not an open_clip/OpenAI CLIP "
                            f"ViT checkpoint (keys start with {sorted(sd)[:4]})")
    return np.shape(sd[key])

  def count(prefix):
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({int(m.group(1)) for k in sd if (m := pat.match(k))})

  v_width, _, patch, _ = shape("visual.conv1.weight")
  t_width = shape("ln_final.weight")[0]
  grid = int(round((shape("visual.positional_embedding")[0] - 1) ** 0.5))
  v_hidden = shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0]
  t_hidden = shape("transformer.resblocks.0.mlp.c_fc.weight")[0]
  return dict(
      embed_dim=shape("text_projection")[1], image_size=grid * patch, patch_size=patch,
      vision_width=v_width, vision_layers=count("visual.transformer.resblocks"),
      text_width=t_width, text_layers=count("transformer.resblocks"),
      context_length=shape("positional_embedding")[0],
      vocab_size=shape("token_embedding.weight")[0],
      vision_mlp_ratio=clip.mlp_ratio(v_width, v_hidden),
      text_mlp_ratio=clip.mlp_ratio(t_width, t_hidden))


# Where each `weight_shapes` field shows in an open_clip state dict, in state-dict order.
_SHAPE_KEYS = [
    ("vision_width", "visual.conv1.weight"), ("patch_size", "visual.conv1.weight"),
    ("image_size", "visual.positional_embedding"),
    ("vision_layers", "visual.transformer.resblocks.*"),
    ("vision_mlp_ratio", "visual.transformer.resblocks.0.mlp.c_fc.weight"),
    ("embed_dim", "visual.proj"), ("vocab_size", "token_embedding.weight"),
    ("context_length", "positional_embedding"), ("text_width", "ln_final.weight"),
    ("text_layers", "transformer.resblocks.*"),
    ("text_mlp_ratio", "transformer.resblocks.0.mlp.c_fc.weight"),
]


def nearest_architectures(shapes: dict, n: int = 3) -> str:
  """The registered architectures closest to a file's `weight_shapes`, each with the
  first key whose shape does not fit it, e.g. "ViT-B-16 (first mismatch:
  visual.positional_embedding, image_size 240 here, 224 there)"."""
  mine = clip.mlp_widths(shapes)
  rows = []
  for name, config in clip.ARCHITECTURES.items():
    if name.endswith("-quickgelu"):
      continue
    theirs = clip.mlp_widths(clip.weight_shapes(config))
    differ = [(f, k) for f, k in _SHAPE_KEYS if mine[f] != theirs[f]]
    if differ:
      field, key = differ[0]
      unit = " hidden" if field.endswith("mlp_ratio") else ""
      rows.append((len(differ), f"{name} (first mismatch: {key}, {field}{unit} {mine[field]} "
                                 f"here, {theirs[field]} there)"))
  rows.sort(key=lambda r: r[0])
  return "; ".join(text for _, text in rows[:n])


def _recorded(architecture: dict, source: str) -> dict:
  """What a file's own record of its architecture (negjax metadata) pins down."""
  try:
    config = clip.CLIPConfig.from_record(architecture)
  except TypeError as e:
    raise CheckpointError(f"{source}: unreadable recorded architecture ({e})") from None
  return {"shapes": clip.weight_shapes(config), "quick_gelu": config.quick_gelu,
          "heads": (config.vision_heads, config.text_heads)}


def choose_config(source: str, recorded: dict, sd: dict | None = None, arch: str | None = None,
                  heads: tuple[int, int] | None = None,
                  quick_gelu: bool | None = None) -> clip.CLIPConfig:
  """The architecture to build for a file, never a guess.

  Shapes come from the file; the head counts and the activation, which shapes cannot
  show, from what the file records, else from the caller (`arch`, or `heads` and
  `quick_gelu`), else (heads only) from the registered architecture of the same shapes.
  What stays open is an error saying what to pass. A stated activation may differ from
  a recorded one (the official NegBench scripts run QuickGELU-trained files as GELU), with
  a warning; stated heads may not.
  """
  if arch is not None:
    if heads is not None or quick_gelu is not None:
      raise CheckpointError(f"{source}: give arch= or heads=/quick_gelu=, not both")
    named = clip.get_config(arch)
    if "shapes" in recorded and (clip.mlp_widths(recorded["shapes"])
                                 != clip.mlp_widths(clip.weight_shapes(named))):
      raise CheckpointError(f"{source}: the file records a different architecture from "
                            f"{arch}: {recorded['shapes']}")
    heads, quick_gelu = (named.vision_heads, named.text_heads), named.quick_gelu
  if heads is not None and recorded.get("heads") not in (None, tuple(heads)):
    raise CheckpointError(f"{source}: the file records {recorded['heads']} attention heads "
                          f"(vision, text), not {tuple(heads)}")
  if quick_gelu is not None and recorded.get("quick_gelu") not in (None, quick_gelu):
    log.warning("%s: the file records %s; using %s as asked", source,
                _activation(recorded["quick_gelu"]), _activation(quick_gelu))
  if arch is not None:
    return named
  heads = tuple(heads) if heads is not None else recorded.get("heads")
  quick_gelu = recorded.get("quick_gelu") if quick_gelu is None else quick_gelu
  shapes = recorded.get("shapes") or infer_shapes(sd, source)
  names = clip.same_shapes(shapes)
  if names:  # the registered MLP ratios, as written in open_clip's configs
    shapes = clip.weight_shapes(clip.ARCHITECTURES[names[0]])
  if heads is None:
    known = {(clip.ARCHITECTURES[n].vision_heads, clip.ARCHITECTURES[n].text_heads)
             for n in names}
    if len(known) != 1:
      raise CheckpointError(
          f"{source}: cannot tell the attention head count: the file does not record it, "
          f"and its shapes (vision width {shapes['vision_width']}, "
          f"{shapes['vision_layers']} layers, patch {shapes['patch_size']}, "
          f"{shapes['image_size']} px; text width {shapes['text_width']}, "
          f"{shapes['text_layers']} layers; embed {shapes['embed_dim']}) match no registered "
          f"architecture; nearest: {nearest_architectures(shapes)}. Pass "
          f"heads=(VISION_HEADS, TEXT_HEADS) and quick_gelu=True/False (open_clip's model "
          f"config: vision width / head_width, text heads), or a known arch= "
          f"({', '.join(n for n in clip.ARCHITECTURES if 'quickgelu' not in n)}, "
          f"each also -quickgelu)")
    heads = known.pop()
  for width, n, tower in ((shapes["vision_width"], heads[0], "vision"),
                          (shapes["text_width"], heads[1], "text")):
    if n < 1 or width % n:
      raise CheckpointError(f"{source}: {n} {tower} heads do not divide width {width}")
  if quick_gelu is None:
    gelu = [n for n in names if not clip.ARCHITECTURES[n].quick_gelu and
            (clip.ARCHITECTURES[n].vision_heads, clip.ARCHITECTURES[n].text_heads) == heads]
    choice = (f"arch='{gelu[0]}' for GELU (open_clip's default, and what the official "
              f"NegBench scripts use for checkpoint files) or arch='{gelu[0]}-quickgelu' for "
              f"QuickGELU (what OpenAI CLIP and models fine-tuned from it were trained with)"
              if gelu else "quick_gelu=False for GELU (open_clip's default) or "
              "quick_gelu=True for QuickGELU (OpenAI CLIP's)")
    raise CheckpointError(
        f"{source}: the file does not record its activation, and GELU and QuickGELU give "
        f"different features from the same weights. Pass {choice}")
  return clip.CLIPConfig(**shapes, vision_heads=heads[0], text_heads=heads[1],
                         quick_gelu=quick_gelu)


def _activation(quick_gelu):
  return "QuickGELU" if quick_gelu else "GELU"


def check_finite(named_arrays, source: str, allow: bool = False) -> None:
  """Refuses weights holding NaN or Inf (every number from them would be meaningless);
  with `allow`, warns instead."""
  bad = {}
  for name, value in named_arrays:
    value = np.asarray(value)
    if value.dtype.kind in "fV":  # V: bfloat16
      count = value.size - int(np.count_nonzero(np.isfinite(value)))
      if count:
        bad[name] = count
  if not bad:
    return
  listed = ", ".join(f"{k} ({n})" for k, n in list(bad.items())[:5])
  message = (f"{source}: {sum(bad.values())} NaN/Inf values in {len(bad)} tensors: {listed}"
             f"{' …' if len(bad) > 5 else ''}")
  if not allow:
    raise CheckpointError(f"{message}; pass allow_nonfinite=True to load it anyway")
  log.warning("%s", message)


# ---------------------------------------------------------------------------------------
# Hugging Face CLIPModel -> canonical.
# ---------------------------------------------------------------------------------------

_HF_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_TOP = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}


def from_hf(hf: dict, source: str) -> dict:
  """Renames a Hugging Face CLIPModel state dict to open_clip's names and layouts."""
  sd, qkv = {}, {}
  layer = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
  for key, value in hf.items():
    if key.endswith("position_ids"):
      continue
    if key in _HF_TOP:
      sd[_HF_TOP[key]] = value
    elif key in ("visual_projection.weight", "text_projection.weight"):
      sd["visual.proj" if key.startswith("visual") else "text_projection"] = np.asarray(value).T
    elif m := layer.match(key):
      tower, i, name, kind = m.groups()
      prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{i}"
      if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        qkv.setdefault((prefix, kind), {})[name[10]] = value
      elif name in _HF_LAYER:
        sd[f"{prefix}.{_HF_LAYER[name]}.{kind}"] = value
      else:
        raise CheckpointError(f"{source}: unexpected Hugging Face key {key!r}")
    else:
      raise CheckpointError(f"{source}: unexpected Hugging Face key {key!r}")
  for (prefix, kind), parts in qkv.items():
    if set(parts) != {"q", "k", "v"}:
      raise CheckpointError(f"{source}: {prefix} lacks some of q/k/v_proj.{kind}")
    sd[f"{prefix}.attn.in_proj_{kind}"] = np.concatenate([parts[c] for c in "qkv"])
  return sd


def _hf_options(config_path: str):
  """(quick_gelu, heads) from a Hugging Face `config.json`."""
  try:
    with open(config_path) as f:
      cfg = json.load(f)
    text, vision = cfg["text_config"], cfg["vision_config"]
  except (OSError, ValueError, KeyError) as e:
    raise CheckpointError(f"{config_path}: not a readable CLIPModel config ({e})") from None
  acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
  if len(acts) != 1 or acts - {"quick_gelu", "gelu"}:
    raise CheckpointError(f"{config_path}: unsupported hidden_act {sorted(acts)}")
  heads = (vision.get("num_attention_heads", 12), text.get("num_attention_heads", 8))
  return acts == {"quick_gelu"}, heads


# ---------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------

def _read_safetensors(path):
  from safetensors import SafetensorError
  from safetensors.numpy import safe_open
  try:
    with safe_open(path, framework="np") as f:
      return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_torch(path):
  """A pickled state dict or an OpenAI TorchScript archive, as NumPy arrays."""
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{path}: reading .pt/.bin files needs PyTorch "
                          "(pip install 'negjax[test]'), or convert it to .safetensors") from None
  try:
    with zipfile.ZipFile(path) as z:
      torchscript = any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
  except zipfile.BadZipFile:
    torchscript = False  # legacy (non-zip) pickle; torch.load judges it below
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({e})") from None
  try:
    if torchscript:
      obj = torch.jit.load(path, map_location="cpu").state_dict()
    else:
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many kinds; all mean the same thing here
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "Weights only load failed" in str(e):
      lines = [l.strip() for l in str(e).splitlines()[1:] if l.strip()]
      detail = "; ".join(l for l in lines if not l.startswith(("Check the", "Please file")))
      raise CheckpointError(
          f"{path}: refused — not a tensors-only pickle, so loading it could run code "
          f"({detail[:200]})") from None
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                          f"{msg[:300]}") from None
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]  # an open_clip training checkpoint
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  out = {}
  for k, v in obj.items():
    k = k[len("module."):] if k.startswith("module.") else k
    if not isinstance(v, torch.Tensor):
      raise CheckpointError(f"{path}: key {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = v.detach().float().numpy() if v.is_floating_point() else v.numpy()
  return out, torchscript


def _is_hf(sd):
  return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


def resolve(name: str) -> str:
  """The file or folder behind a checkpoint name; any other string is returned as it is.

  - `openai:ARCH`: OpenAI's release, cached in CACHE_DIR/openai/ (downloaded with a network);
  - `ARCH:PRETRAINED` (open_clip's names, e.g. `ViT-H-14:laion2b_s32b_b79k`): the weights
    file in CACHE_DIR/open_clip/ARCH/PRETRAINED/ (fetched by open_clip, when installed);
    `ARCH:openai` is `openai:ARCH`;
  - `hf:ORG/NAME`: the snapshot folder of that repository in the Hugging Face hub cache
    (fetched by huggingface_hub, when installed).
  Without a network the error says exactly where the file or folder must be placed.
  """
  name = str(name)
  if name.startswith("openai:"):
    return _resolve_openai(name, name.split(":", 1)[1])
  if name.startswith("hf:"):
    return _resolve_hf(name)
  if named := open_clip_name(name):
    return _resolve_open_clip(name, *named)
  return name


def is_name(name: str) -> bool:
  """Whether `name` is one of `resolve`'s names (an existing path never is)."""
  name = str(name)
  return not os.path.exists(name) and (
      name.startswith(("openai:", "hf:")) or _OPEN_CLIP_NAME.fullmatch(name) is not None)


def _resolve_openai(name, arch):
  if arch not in OPENAI_URLS:
    raise CheckpointError(f"{name}: unknown OpenAI model; known: "
                          f"{', '.join('openai:' + a for a in OPENAI_URLS)}")
  url = OPENAI_URLS[arch]
  target = os.path.join(CACHE_DIR, "openai", os.path.basename(url))
  if os.path.exists(target):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  log.info("downloading %s to %s", url, target)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".part")
  try:  # a failed or interrupted download leaves nothing in the cache
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as src:
      while chunk := src.read(1 << 20):
        digest.update(chunk)
        out.write(chunk)
    if digest.hexdigest() != url.split("/")[-2]:
      raise CheckpointError(f"{name}: download from {url} has the wrong SHA-256")
    os.replace(tmp, target)
  except OSError as e:
    raise CheckpointError(
        f"{name}: could not download {url} ({e}). Without a network, fetch that file "
        f"elsewhere and put it at {target} (or pass its path to load_model).") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


# The file names open_clip's weights have in its Hugging Face repositories (open_clip 3.3.0
# open_clip/constants.py HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME), safetensors first.
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Pretrained tags trained with QuickGELU (open_clip 3.3.0 open_clip/pretrained.py: the tags
# of the registered architectures whose config says quick_gelu=True): loading them as GELU
# gives plausible but wrong features, so `ARCH:TAG` without -quickgelu is refused.
_OPEN_CLIP_NAME = re.compile(r"([A-Za-z][\w.-]*):([A-Za-z0-9][\w.-]*)")  # ARCH:PRETRAINED
QUICKGELU_TAGS = {"openai", "metaclip_400m", "metaclip_fullcc", "dfn2b", "dfn5b",
                  "ViT-B-32:laion400m_e31", "ViT-B-32:laion400m_e32"}


def open_clip_name(name: str) -> tuple[str, str] | None:
  """(ARCH, PRETRAINED) when `name` is open_clip's `ARCH:PRETRAINED` form and no such file
  exists; an ARCH negjax does not register is an error listing the near names."""
  m = _OPEN_CLIP_NAME.fullmatch(str(name))
  if not m or os.path.exists(name) or m.group(1) in ("openai", "hf"):
    return None
  arch, tag = m.groups()
  if arch not in clip.ARCHITECTURES:
    raise CheckpointError(f"{name}: no such file, nor open_clip's ARCH:PRETRAINED: unknown "
                          f"architecture {arch!r}{clip.near_names(arch)}")
  return arch, tag


def _resolve_open_clip(name, arch, tag):
  base = arch.removesuffix("-quickgelu")
  if tag == "openai":
    return _resolve_openai(name, base)
  if base == arch and (tag in QUICKGELU_TAGS or f"{base}:{tag}" in QUICKGELU_TAGS):
    raise CheckpointError(f"{name}: open_clip's {tag} weights were trained with QuickGELU; "
                          f"name them {base}-quickgelu:{tag} (or pass the file's path with "
                          f"arch='{base}' to run them as GELU on purpose)")
  folder = os.path.join(CACHE_DIR, "open_clip", base, tag)
  for file in OPEN_CLIP_FILES:
    if os.path.exists(os.path.join(folder, file)):
      return os.path.join(folder, file)
  place = (f"put open_clip's weights file for it at {os.path.join(folder, OPEN_CLIP_FILES[0])}"
           f" (or {OPEN_CLIP_FILES[1]} there)")
  try:
    return _download_open_clip(base, tag, folder)
  except _NoDownload as e:
    raise CheckpointError(f"{name}: not in the cache, and {e}. Without a network, "
                          f"{place}.") from None


class _NoDownload(Exception):
  """Why a download did not happen (no downloader installed, unknown name, no network)."""


def _download_open_clip(arch, tag, folder):
  """Fetches `ARCH:PRETRAINED` the way open_clip does, into `folder`; open_clip is needed
  for its table of where each pretrained tag lives."""
  try:
    from negjax.reference import open_clip
    oc = open_clip()
  except ImportError:
    raise _NoDownload("open_clip is not installed to fetch it (pip install open_clip_torch)")
  cfg = oc.pretrained.get_pretrained_cfg(arch, tag)
  if not cfg:
    tags = oc.pretrained.list_pretrained_tags_by_model(arch)
    near = difflib.get_close_matches(tag, tags, n=3)
    raise _NoDownload(f"open_clip has no {arch} weights called {tag!r}"
                      f"{'; did you mean ' + ' or '.join(near) + '?' if near else ''} "
                      f"(known: {', '.join(tags) or 'none'})")
  where = cfg.get("hf_hub") or cfg.get("url")
  staging = os.path.join(folder, ".download")
  try:
    got = oc.pretrained.download_pretrained(cfg, cache_dir=staging)
    target = os.path.join(folder, OPEN_CLIP_FILES[0 if got.endswith(".safetensors") else 1])
    shutil.move(os.path.realpath(got), target)
  except Exception as e:  # hub and URL downloads raise many kinds; all mean no file
    raise _NoDownload(f"downloading it from {where} failed ({str(e).splitlines()[0][:200]})")
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


def hf_hub_cache() -> str:
  """The Hugging Face hub cache folder, as huggingface_hub finds it."""
  home = os.environ.get("HF_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
  return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))


def _resolve_hf(name):
  repo = name[len("hf:"):]
  if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
    raise CheckpointError(f"{name}: a Hugging Face name is hf:ORG/NAME")
  root = os.path.join(hf_hub_cache(), "models--" + repo.replace("/", "--"))
  snapshots = os.path.join(root, "snapshots")
  try:
    with open(os.path.join(root, "refs", "main")) as f:
      ref = f.read().strip()
    if os.path.isdir(os.path.join(snapshots, ref)):
      return os.path.join(snapshots, ref)
  except OSError:
    pass
  found = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
  if len(found) == 1:
    return os.path.join(snapshots, found[0])
  if found:
    raise CheckpointError(f"{name}: {snapshots} holds {len(found)} snapshots and "
                          f"refs/main names none of them; pass the folder's path")
  try:
    return _download_hf(repo)
  except _NoDownload as e:
    raise CheckpointError(
        f"{name}: not in the Hugging Face cache, and {e}. Without a network, put the "
        f"repository's files (config.json, model.safetensors, tokenizer files) in "
        f"{os.path.join(snapshots, 'main')}/ (or pass their folder's path).") from None


def _download_hf(repo):
  """The repository's config, weights and tokenizer files, fetched into the hub cache."""
  try:
    import huggingface_hub
  except ImportError:
    raise _NoDownload("huggingface_hub is not installed to fetch it "
                      "(pip install huggingface_hub)") from None
  try:
    return huggingface_hub.snapshot_download(
        repo, cache_dir=hf_hub_cache(),
        allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
  except Exception as e:  # network, auth and not-found errors all mean no folder
    raise _NoDownload(f"downloading it failed ({str(e).splitlines()[0][:200]})") from None


def read_canonical(path: str) -> tuple[dict, dict]:
  """Reads any supported file into (open_clip state dict, what the file records about its
  architecture: some of "shapes", "heads", "quick_gelu")."""
  recorded = {}
  if os.path.isdir(path):
    cfg_file = os.path.join(path, "config.json")
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.exists(os.path.join(path, name)) and os.path.exists(cfg_file):
        sd, _ = read_canonical(os.path.join(path, name))
        return sd, _recorded_by_hf(cfg_file)
    raise CheckpointError(f"{path}: a folder must be a Hugging Face CLIPModel (config.json + "
                          "model.safetensors) or a negjax Orbax checkpoint")
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    sd, meta = _read_safetensors(path)
    if CONFIG_KEY in meta:
      try:
        recorded = _recorded(json.loads(meta[CONFIG_KEY]), path)
      except ValueError as e:
        raise CheckpointError(f"{path}: unreadable {CONFIG_KEY} metadata ({e})") from None
  else:
    sd, torchscript = _read_torch(path)
    if torchscript or any(k in sd for k in _OPENAI_EXTRAS):
      # OpenAI's own archives: QuickGELU, and heads 64 wide (its build_model's width // 64).
      recorded = {"quick_gelu": True}
      widths = [len(sd[k]) for k in ("visual.conv1.weight", "ln_final.weight") if k in sd]
      if len(widths) == 2:
        recorded["heads"] = (widths[0] // 64, widths[1] // 64)
  if _is_hf(sd):
    cfg_file = os.path.join(os.path.dirname(path), "config.json")
    if os.path.exists(cfg_file):
      recorded = _recorded_by_hf(cfg_file)
    sd = from_hf(sd, path)
  return sd, recorded


def _recorded_by_hf(cfg_file):
  quick, heads = _hf_options(cfg_file)
  return {"quick_gelu": quick, "heads": heads}


def load_model(path_or_name: str, arch: str | None = None, *,
               heads: tuple[int, int] | None = None, quick_gelu: bool | None = None,
               allow_nonfinite: bool = False, **options) -> clip.CLIP:
  """Loads CLIP weights from any supported file or folder, or a name (`openai:ARCH`,
  open_clip's `ARCH:PRETRAINED`, `hf:ORG/NAME`: see `resolve`).

  The architecture comes from the file where it records it (negjax files, Hugging Face
  config.json, OpenAI archives); what it does not record must be stated: `arch` (a
  registered name, e.g. "ViT-B-32" or "ViT-B-32-quickgelu"), or for other shapes `heads`
  ((vision, text) head counts) and `quick_gelu`. Weights holding NaN/Inf are refused unless
  `allow_nonfinite`. `options` set numerics (dtype, param_dtype, scan_layers, remat).
  """
  path = str(path_or_name)
  named = open_clip_name(path)
  if named and named[1] != "openai" and (arch, heads, quick_gelu) == (None, None, None):
    arch = named[0]  # open_clip's ARCH:PRETRAINED names the architecture
  path = resolve(path)
  stated = dict(arch=arch, heads=heads, quick_gelu=quick_gelu)
  from negjax.models import siglip  # SigLIP: Hugging Face SiglipModel folders, big_vision .npz
  if siglip.is_siglip(path):
    return siglip.load(path, **stated, allow_nonfinite=allow_nonfinite, **options)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, ORBAX_CONFIG_FILE)):
    config = choose_config(path, _recorded(_read_orbax_config(path), path), **stated)
    model = load_orbax(path, config.replace(**options))
    params = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    check_finite(((jax.tree_util.keystr(k), v) for k, v in params), path, allow_nonfinite)
    return model
  sd, recorded = read_canonical(path)
  config = choose_config(path, recorded, sd, **stated)
  check_finite(sd.items(), path, allow_nonfinite)
  return from_state_dict(sd, config.replace(**options), path)


def save_open_clip(model: clip.CLIP, path: str, dtype="float32") -> None:
  """Writes open_clip-layout `.safetensors` (float32, or e.g. float16 to halve the file),
  atomically, with the architecture in the metadata; `open_clip.create_model(arch,
  pretrained=path)` reads it."""
  from safetensors.numpy import save_file
  path = str(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  tensors = {k: v.astype(dtype) for k, v in state_dict(model).items()}
  save_file(tensors, tmp, metadata={CONFIG_KEY: json.dumps(model.config.architecture)})
  os.replace(tmp, path)


def _family(model):
  """The module of `model`'s family (negjax.models.clip or .siglip)."""
  from negjax.models import siglip
  return siglip if isinstance(model, siglip.SigLIP) else clip


def architecture_name(model) -> str | None:
  """The registered architecture name of any negjax model, if its config is one."""
  return _family(model).architecture_name(model.config)


def export_name(model) -> str:
  """What `save_model` writes for `model`: a Hugging Face folder for SigLIP ("model"), an
  open_clip file otherwise ("model.safetensors")."""
  return "model" if _family(model) is not clip else "model.safetensors"


def save_model(model, path: str, dtype="float32") -> None:
  """`model` in the form its family is read back from, atomically: SigLIP as a Hugging Face
  folder (`siglip.save_hf_folder`), CLIP as open_clip `.safetensors` (`save_open_clip`)."""
  family = _family(model)
  if family is clip:
    save_open_clip(model, path, dtype)
  else:
    family.save_hf_folder(model, path, dtype)


def save_orbax(model: clip.CLIP, directory: str) -> None:
  """Writes parameters as an Orbax checkpoint plus the architecture beside it.

  Orbax creates folders asynchronously by default; when that fails (a file where the
  folder should be, a read-only or vanished parent) its other save threads wait for the
  folder for 5 minutes and keep the process from exiting. Creating them up front, without
  that option, makes such a failure an immediate error."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  params = nnx.state(model, nnx.Param)
  options = ocp.options.AsyncOptions(create_directories_asynchronously=False)
  with ocp.StandardCheckpointer(async_options=options) as ckptr:
    ckptr.save(os.path.join(directory, "params"), params, force=True)
  with open(os.path.join(directory, ORBAX_CONFIG_FILE), "w") as f:
    json.dump(model.config.architecture, f, indent=1)


def _read_orbax_config(directory):
  path = os.path.join(directory, ORBAX_CONFIG_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise CheckpointError(f"{path}: not readable JSON ({e})") from None


def load_orbax(directory: str, config: clip.CLIPConfig) -> clip.CLIP:
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  model = nnx.eval_shape(lambda: clip.CLIP(config, nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(directory, "params"), params)
  return nnx.merge(graphdef, params, rest)
