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


def infer_config(sd: dict, source: str = "<state dict>", quick_gelu: bool = False,
                 heads: tuple[int, int] | None = None) -> clip.CLIPConfig:
  """The architecture of an open_clip state dict, from its tensor shapes.

  Shapes fix everything but the attention head count (taken as width / 64, the width
  of every released CLIP head, unless `heads` says otherwise) and the activation.
  """
  def shape(key):
    if key not in sd:
      raise CheckpointError(f"{source}: missing key {key!r}; not an open_clip/OpenAI CLIP "
                            f"ViT checkpoint (keys start with {sorted(sd)[:4]})")
    return np.shape(sd[key])

  def count(prefix):
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({int(m.group(1)) for k in sd if (m := pat.match(k))})

  v_width, _, patch, _ = shape("visual.conv1.weight")
  grid = int(round((shape("visual.positional_embedding")[0] - 1) ** 0.5))
  t_width = shape("ln_final.weight")[0]
  heads = heads or (v_width // 64, t_width // 64)
  hidden = shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0]
  return clip.CLIPConfig(
      embed_dim=shape("text_projection")[1], image_size=grid * patch, patch_size=patch,
      vision_width=v_width, vision_layers=count("visual.transformer.resblocks"),
      vision_heads=heads[0], text_width=t_width, text_layers=count("transformer.resblocks"),
      text_heads=heads[1], context_length=shape("positional_embedding")[0],
      vocab_size=shape("token_embedding.weight")[0], mlp_ratio=hidden / v_width,
      quick_gelu=quick_gelu)


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


def _resolve(name: str) -> str:
  """`openai:ARCH` -> the cached official file, downloading it when a network exists."""
  arch = name.split(":", 1)[1]
  if arch not in OPENAI_URLS:
    raise CheckpointError(f"{name}: unknown OpenAI model; known: "
                          f"{', '.join('openai:' + a for a in OPENAI_URLS)}")
  url = OPENAI_URLS[arch]
  target = os.path.join(CACHE_DIR, "openai", os.path.basename(url))
  if os.path.exists(target):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  log.info("downloading %s to %s", url, target)
  try:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target))
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as src:
      while chunk := src.read(1 << 20):
        digest.update(chunk)
        out.write(chunk)
  except OSError as e:
    raise CheckpointError(
        f"{name}: could not download {url} ({e}). Without a network, fetch that file "
        f"elsewhere and put it at {target} (or pass its path to load_model).") from None
  if digest.hexdigest() != url.split("/")[-2]:
    os.remove(tmp)
    raise CheckpointError(f"{name}: download from {url} has the wrong SHA-256")
  os.replace(tmp, target)
  return target


def read_canonical(path: str) -> tuple[dict, dict]:
  """Reads any supported file into (open_clip state dict, hints for the architecture)."""
  hints = {}
  if os.path.isdir(path):
    cfg_file = os.path.join(path, "config.json")
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.exists(os.path.join(path, name)) and os.path.exists(cfg_file):
        sd, _ = read_canonical(os.path.join(path, name))
        return sd, hints | _hints_from_hf(cfg_file)
    raise CheckpointError(f"{path}: a folder must be a Hugging Face CLIPModel (config.json + "
                          "model.safetensors) or a negjax Orbax checkpoint")
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    sd, meta = _read_safetensors(path)
    if CONFIG_KEY in meta:
      hints["config"] = json.loads(meta[CONFIG_KEY])
  else:
    sd, torchscript = _read_torch(path)
    if torchscript or any(k in sd for k in _OPENAI_EXTRAS):
      hints["quick_gelu"] = True  # OpenAI's own releases all use QuickGELU
  if _is_hf(sd):
    cfg_file = os.path.join(os.path.dirname(path), "config.json")
    if os.path.exists(cfg_file):
      hints |= _hints_from_hf(cfg_file)
    sd = from_hf(sd, path)
  return sd, hints


def _hints_from_hf(cfg_file):
  quick, heads = _hf_options(cfg_file)
  return {"quick_gelu": quick, "heads": heads}


def load_model(path_or_name: str, arch: str | None = None, **options) -> clip.CLIP:
  """Loads CLIP weights from any supported file, folder or `openai:ARCH` name.

  `arch` names the architecture (e.g. "ViT-B-32-quickgelu"); without it the architecture
  is read from the file's metadata or inferred from tensor shapes. `options` set numerics
  (dtype, param_dtype, scan_layers, remat).
  """
  path = str(path_or_name)
  if path.startswith("openai:"):
    path = _resolve(path)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, ORBAX_CONFIG_FILE)):
    return load_orbax(path, **options)
  sd, hints = read_canonical(path)
  if arch is not None:
    config = clip.get_config(arch)
  elif "config" in hints:
    config = clip.CLIPConfig(**hints["config"])
  else:
    config = infer_config(sd, path, hints.get("quick_gelu", False), hints.get("heads"))
    if "quick_gelu" not in hints:
      log.warning("%s: activation not recorded in the file; using GELU (open_clip's default). "
                  "Pass arch='NAME-quickgelu' if these weights were trained with QuickGELU.",
                  path)
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


def save_orbax(model: clip.CLIP, directory: str) -> None:
  """Writes parameters as an Orbax checkpoint plus the architecture beside it."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  params = nnx.state(model, nnx.Param)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "params"), params, force=True)
  with open(os.path.join(directory, ORBAX_CONFIG_FILE), "w") as f:
    json.dump(model.config.architecture, f, indent=1)


def load_orbax(directory: str, **options) -> clip.CLIP:
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, ORBAX_CONFIG_FILE)) as f:
    config = clip.CLIPConfig(**json.load(f)).replace(**options)
  model = nnx.eval_shape(lambda: clip.CLIP(config, nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(directory, "params"), params)
  return nnx.merge(graphdef, params, rest)
