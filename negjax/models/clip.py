"""CLIP in Flax NNX with open_clip's numerics: ViT image tower, causal text tower.

The same weights give the same features as open_clip's `CLIP` (pre-LN residual blocks,
class token, ln_pre/ln_post, bias-free projections, text pooled at the EOT token, which
is the largest id). Transformer layers are stored stacked (a leading layer axis) so one
parameter layout serves both the unrolled loop and `jax.lax.scan`.
"""
import dataclasses
import difflib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from negjax.models.layers import LayerNorm, Transformer


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Architecture plus numerics options; the fields after `quick_gelu` are not weights.

  The MLP ratio is per tower (open_clip's ViT-g-14 and ViT-bigG-14 widen only the vision
  MLP); the hidden width is int(width * ratio), as in open_clip."""
  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  text_width: int
  text_layers: int
  text_heads: int
  context_length: int = 77
  vocab_size: int = 49408
  vision_mlp_ratio: float = 4.0
  text_mlp_ratio: float = 4.0
  quick_gelu: bool = False
  # Numerics: compute dtype, parameter dtype, scan over layers, rematerialise layers.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def replace(self, **kw) -> "CLIPConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_record(cls, architecture: dict) -> "CLIPConfig":
    """The config a file's recorded `architecture` dict describes. Files written before
    the MLP ratio was per tower record one `mlp_ratio` that both towers used."""
    architecture = dict(architecture)
    if "mlp_ratio" in architecture:
      ratio = architecture.pop("mlp_ratio")
      architecture.setdefault("vision_mlp_ratio", ratio)
      architecture.setdefault("text_mlp_ratio", ratio)
    return cls(**architecture)

  @property
  def activation(self) -> str:
    return "quick_gelu" if self.quick_gelu else "gelu"

  @property
  def transformer_options(self) -> dict:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype, scan=self.scan_layers,
                remat=self.remat)

  @property
  def architecture(self) -> dict:
    """The weight-defining fields only (what a checkpoint pins down)."""
    names = [f.name for f in dataclasses.fields(self)]
    return {n: getattr(self, n) for n in names[:names.index("quick_gelu") + 1]}


def _vit(embed_dim, image_size, patch_size, vision, text, vision_mlp_ratio=4.0):
  """A ViT CLIP in open_clip's terms: vision (width, layers, head_width), text (width,
  layers, heads)."""
  (v_width, v_layers, head_width), (t_width, t_layers, t_heads) = vision, text
  return CLIPConfig(
      embed_dim=embed_dim, image_size=image_size, patch_size=patch_size,
      vision_width=v_width, vision_layers=v_layers, vision_heads=v_width // head_width,
      text_width=t_width, text_layers=t_layers, text_heads=t_heads,
      vision_mlp_ratio=vision_mlp_ratio)


# open_clip's ViT CLIPs with released weights, by open_clip's names. Each number is from
# open_clip 3.3.0's open_clip/model_configs/NAME.json (head_width 64, mlp_ratio 4.0,
# context_length 77, vocab_size 49408 where the file leaves them to CLIPVisionCfg /
# CLIPTextCfg's defaults in open_clip/model.py); tests/test_architectures.py checks every
# entry against the installed open_clip. Every architecture also exists as NAME-quickgelu:
# open_clip ships that file for ViT-B-32, B-16, L-14, L-14-336, H-14, H-14-378 and bigG-14,
# and builds the same model for the others with force_quick_gelu=True.
_BASE = {
    # ViT-B-32.json, ViT-B-32-256.json: vision 768 wide, 12 layers; text 512, 12, 8 heads.
    "ViT-B-32": _vit(512, 224, 32, vision=(768, 12, 64), text=(512, 12, 8)),
    "ViT-B-32-256": _vit(512, 256, 32, vision=(768, 12, 64), text=(512, 12, 8)),
    # ViT-B-16.json.
    "ViT-B-16": _vit(512, 224, 16, vision=(768, 12, 64), text=(512, 12, 8)),
    # ViT-B-16-plus-240.json: embed 640, 240 px, vision 896 wide (14 heads); text 640, 10.
    "ViT-B-16-plus-240": _vit(640, 240, 16, vision=(896, 12, 64), text=(640, 12, 10)),
    # ViT-L-14.json, ViT-L-14-336.json: vision 1024, 24 layers; text 768, 12, 12 heads.
    "ViT-L-14": _vit(768, 224, 14, vision=(1024, 24, 64), text=(768, 12, 12)),
    "ViT-L-14-336": _vit(768, 336, 14, vision=(1024, 24, 64), text=(768, 12, 12)),
    # ViT-H-14.json, ViT-H-14-378.json, ViT-H-16.json: vision 1280, 32 layers, head_width
    # 80 (16 heads, not 1280 / 64); text 1024, 24 layers, 16 heads; embed 1024.
    "ViT-H-14": _vit(1024, 224, 14, vision=(1280, 32, 80), text=(1024, 24, 16)),
    "ViT-H-14-378": _vit(1024, 378, 14, vision=(1280, 32, 80), text=(1024, 24, 16)),
    "ViT-H-16": _vit(1024, 224, 16, vision=(1280, 32, 80), text=(1024, 24, 16)),
    # ViT-g-14.json: vision 1408, 40 layers, head_width 88, mlp_ratio 4.3637 (text 4.0).
    "ViT-g-14": _vit(1024, 224, 14, vision=(1408, 40, 88), text=(1024, 24, 16),
                     vision_mlp_ratio=4.3637),
    # ViT-bigG-14.json: embed 1280; vision 1664, 48 layers, head_width 104, mlp_ratio
    # 4.9231 (text 4.0); text 1280, 32 layers, 20 heads.
    "ViT-bigG-14": _vit(1280, 224, 14, vision=(1664, 48, 104), text=(1280, 32, 20),
                        vision_mlp_ratio=4.9231),
    # Small enough for CPU tests: 32px images, two layers of two heads per tower.
    "negjax-tiny": _vit(64, 32, 8, vision=(128, 2, 64), text=(128, 2, 2)),
    # The shapes-CLIP that ships with negjax: 64px images, four layers per tower.
    "negjax-shapes": _vit(128, 64, 8, vision=(128, 4, 64), text=(128, 4, 2)),
}
ARCHITECTURES = dict(_BASE)
ARCHITECTURES.update(
    {f"{k}-quickgelu": v.replace(quick_gelu=True) for k, v in _BASE.items()})


def near_names(arch: str) -> str:
  """What to tell about a name that is not registered: the near names first, e.g.
  "; did you mean ViT-H-14? (known: ...)"."""
  near = difflib.get_close_matches(arch, ARCHITECTURES, n=4, cutoff=0.6)
  hint = f"; did you mean {' or '.join(near)}?" if near else ""
  return (f"{hint} (known: {', '.join(n for n in ARCHITECTURES if not n.endswith('-quickgelu'))}"
          f", each also NAME-quickgelu)")


def get_config(arch: str, **overrides) -> CLIPConfig:
  if arch not in ARCHITECTURES:
    raise ValueError(f"Unknown architecture {arch!r}{near_names(arch)}")
  return ARCHITECTURES[arch].replace(**overrides)


def architecture_name(config: CLIPConfig) -> str | None:
  """The registered name whose weights and activation match `config`, if any."""
  for name, known in ARCHITECTURES.items():
    if known.architecture == config.architecture:
      return name
  return None


def weight_shapes(config: CLIPConfig) -> dict:
  """The architecture fields that tensor shapes fix: all but the head counts and the
  activation, which no shape shows."""
  return {k: v for k, v in config.architecture.items()
          if k not in ("vision_heads", "text_heads", "quick_gelu")}


def mlp_ratio(width: int, hidden: int) -> float:
  """The ratio whose MLP is `hidden` wide, int(width * ratio) (hidden / width alone can
  fall one ulp short: 120 / 88 * 88 < 120)."""
  ratio = hidden / width
  while int(width * ratio) < hidden:
    ratio = math.nextafter(ratio, math.inf)
  return ratio


def mlp_widths(shapes: dict) -> dict:
  """`shapes` with each MLP ratio replaced by the hidden width it gives (what a tensor
  shows: a ratio written as 4.3637 or as 6144 / 1408 is the same MLP)."""
  return {**shapes,
          "vision_mlp_ratio": int(shapes["vision_width"] * shapes["vision_mlp_ratio"]),
          "text_mlp_ratio": int(shapes["text_width"] * shapes["text_mlp_ratio"])}


def same_shapes(shapes: dict) -> list[str]:
  """Registered names whose weights have these `weight_shapes`."""
  want = mlp_widths(shapes)
  return [n for n, known in ARCHITECTURES.items() if mlp_widths(weight_shapes(known)) == want]


# open_clip 3.3.0 open_clip/model.py: the CLIPVisionCfg / CLIPTextCfg / CLIP fields that
# negjax's towers do not vary, at open_clip's defaults. Any other value changes the
# numerics or the weights (LayerScale, attentional pooling, no ln_pre, pooling, another
# tokenizer, timm or HF towers, ...), so a config that sets one is refused.
_OPEN_CLIP_FIXED = {
    "": {"custom_text": False, "init_logit_bias": None, "nonscalar_logit_scale": False},
    "vision_cfg": {
        "ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False,
        "no_ln_pre": False, "pos_embed_type": "learnable", "final_ln_after_pool": False,
        "pool_type": "tok", "output_tokens": False, "act_kwargs": None, "norm_kwargs": None,
        "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
        "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
        "scale_fc": False, "timm_model_name": None},
    "text_cfg": {
        "hf_tokenizer_name": None, "tokenizer_mode": None, "tokenizer_kwargs": None,
        "ls_init_value": None, "embed_cls": False, "pad_id": 0, "no_causal_mask": False,
        "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False,
        "proj_type": "linear", "output_tokens": False, "act_kwargs": None,
        "norm_kwargs": None, "block_type": None, "qk_norm": False,
        "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
        "scale_attn": False, "scale_fc": False, "hf_model_name": None},
}
# Fields that only matter when another field is set (attn_pooler_* with attentional_pool,
# eos_id with pool_type "eos", timm_* / hf_* with a timm or HF tower), or that only set
# the initial value of a weight every checkpoint holds (init_logit_scale).
_OPEN_CLIP_INERT = {
    "": {"init_logit_scale"},
    "vision_cfg": {"attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained",
                   "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"},
    "text_cfg": {"eos_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"},
}
_OPEN_CLIP_USED = {
    "": {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"},
    "vision_cfg": {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size"},
    "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"},
}


def from_open_clip_config(cfg: dict, source: str = "open_clip config") -> CLIPConfig:
  """The CLIPConfig of an open_clip model config (the JSON in open_clip/model_configs).

  Every field is either used or checked to be at the default negjax implements; anything
  else (a ResNet or timm tower, LayerScale, attentional pooling, another tokenizer, ...)
  raises ValueError naming the field, rather than building a model that computes
  something else."""
  for part in ("", "vision_cfg", "text_cfg"):
    fields = cfg if part == "" else cfg.get(part, {})
    for key, value in fields.items():
      name = f"{part}.{key}" if part else key
      if key in _OPEN_CLIP_USED[part] or key in _OPEN_CLIP_INERT[part]:
        continue
      if key not in _OPEN_CLIP_FIXED[part]:
        raise ValueError(f"{source}: unknown open_clip field {name}={value!r}")
      if value != _OPEN_CLIP_FIXED[part][key]:
        raise ValueError(f"{source}: {name}={value!r} is not supported by negjax's CLIP "
                         f"(it implements {name}={_OPEN_CLIP_FIXED[part][key]!r})")
  v, t = cfg["vision_cfg"], cfg["text_cfg"]
  if isinstance(v.get("layers", 12), (list, tuple)):
    raise ValueError(f"{source}: vision_cfg.layers={v['layers']!r} is a ResNet tower; negjax "
                     "implements ViT towers only")
  size = v.get("image_size", 224)
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      raise ValueError(f"{source}: vision_cfg.image_size={size!r}: only square images")
    size = size[0]
  width, head_width = v.get("width", 768), v.get("head_width", 64)
  if width % head_width:
    raise ValueError(f"{source}: vision_cfg.head_width={head_width} does not divide "
                     f"width {width}")
  return CLIPConfig(
      embed_dim=cfg["embed_dim"], image_size=size, patch_size=v.get("patch_size", 16),
      vision_width=width, vision_layers=v.get("layers", 12), vision_heads=width // head_width,
      text_width=t.get("width", 512), text_layers=t.get("layers", 12),
      text_heads=t.get("heads", 8), context_length=t.get("context_length", 77),
      vocab_size=t.get("vocab_size", 49408), vision_mlp_ratio=v.get("mlp_ratio", 4.0),
      text_mlp_ratio=t.get("mlp_ratio", 4.0), quick_gelu=bool(cfg.get("quick_gelu", False)))


def open_clip_config(config: CLIPConfig) -> dict:
  """The model config JSON open_clip expects for this architecture."""
  cfg = {
      "embed_dim": config.embed_dim,
      "vision_cfg": {"image_size": config.image_size, "layers": config.vision_layers,
                     "width": config.vision_width, "patch_size": config.patch_size,
                     "head_width": config.vision_width // config.vision_heads,
                     "mlp_ratio": config.vision_mlp_ratio},
      "text_cfg": {"context_length": config.context_length, "vocab_size": config.vocab_size,
                   "width": config.text_width, "heads": config.text_heads,
                   "layers": config.text_layers, "mlp_ratio": config.text_mlp_ratio},
  }
  if config.quick_gelu:
    cfg["quick_gelu"] = True
  return cfg


class VisionTower(nnx.Module):
  """ViT: patches -> [CLS]+patches + pos -> ln_pre -> blocks -> ln_post(CLS) @ proj."""

  def __init__(self, c: CLIPConfig, rngs: nnx.Rngs):
    self.patch_size = c.patch_size
    self.dtype = c.dtype
    w, p, grid = c.vision_width, c.patch_size, c.image_size // c.patch_size
    scale = w ** -0.5
    key = rngs.params
    # The patch conv as a matmul over (row, col, channel)-flattened patches.
    self.patch_embed = nnx.Param(
        jax.random.normal(key(), (p * p * 3, w), c.param_dtype) * (p * p * 3) ** -0.5)
    self.class_embedding = nnx.Param(jax.random.normal(key(), (w,), c.param_dtype) * scale)
    self.positional_embedding = nnx.Param(
        jax.random.normal(key(), (grid * grid + 1, w), c.param_dtype) * scale)
    self.ln_pre = LayerNorm(w, c.dtype, c.param_dtype)
    self.transformer = Transformer(w, c.vision_layers, c.vision_heads, c.vision_mlp_ratio,
                                   c.activation, False, rngs, **c.transformer_options)
    self.ln_post = LayerNorm(w, c.dtype, c.param_dtype)
    self.proj = nnx.Param(jax.random.normal(key(), (w, c.embed_dim), c.param_dtype) * scale)

  def __call__(self, images):
    b, h, w_img, ch = images.shape
    p = self.patch_size
    patches = images.reshape(b, h // p, p, w_img // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (h // p) * (w_img // p), p * p * ch).astype(self.dtype)
    x = patches @ self.patch_embed[...].astype(self.dtype)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(self.dtype)
    pooled = self.ln_post(self.transformer(self.ln_pre(x), pool=jnp.zeros((b,), jnp.int32)))
    return pooled @ self.proj[...].astype(self.dtype)


class TextTower(nnx.Module):
  """Causal transformer over BPE ids, pooled at the EOT token (the argmax id)."""

  def __init__(self, c: CLIPConfig, rngs: nnx.Rngs):
    self.dtype = c.dtype
    w = c.text_width
    key = rngs.params
    self.token_embedding = nnx.Param(
        jax.random.normal(key(), (c.vocab_size, w), c.param_dtype) * 0.02)
    self.positional_embedding = nnx.Param(
        jax.random.normal(key(), (c.context_length, w), c.param_dtype) * 0.01)
    self.transformer = Transformer(w, c.text_layers, c.text_heads, c.text_mlp_ratio,
                                   c.activation, True, rngs, **c.transformer_options)
    self.ln_final = LayerNorm(w, c.dtype, c.param_dtype)
    self.text_projection = nnx.Param(
        jax.random.normal(key(), (w, c.embed_dim), c.param_dtype) * w ** -0.5)

  def __call__(self, ids):
    ids = jnp.asarray(ids, jnp.int32)
    x = jnp.take(self.token_embedding[...], ids, axis=0).astype(self.dtype)
    x = x + self.positional_embedding[...][: ids.shape[1]].astype(self.dtype)
    pooled = self.ln_final(self.transformer(x, pool=jnp.argmax(ids, axis=-1)))
    return pooled @ self.text_projection[...].astype(self.dtype)


class CLIP(nnx.Module):
  """Two towers and a learned temperature; features come out in float32."""

  def __init__(self, config: CLIPConfig, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = config
    self.visual = VisionTower(config, rngs)
    self.text = TextTower(config, rngs)
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), config.param_dtype))

  def encode_image(self, images):
    """float32 NHWC, already preprocessed -> unnormalised [N, embed_dim] features."""
    images = jnp.asarray(images)
    size = self.config.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"encode_image: got images of shape {tuple(images.shape)}; this model "
                       f"takes [N, {size}, {size}, 3] (preprocess(image, size={size}))")
    return self.visual(images).astype(jnp.float32)

  def encode_text(self, ids):
    """int32 [N, context_length] token ids -> unnormalised [N, embed_dim] features."""
    return self.text(ids).astype(jnp.float32)

  def temperature(self):
    """exp(logit_scale), clamped at 100 as in CLIP training."""
    return jnp.minimum(jnp.exp(self.logit_scale[...].astype(jnp.float32)), 100.0)

  def __call__(self, images, ids):
    """Returns (logits_per_image [Ni, Nt], logits_per_text [Nt, Ni]), as open_clip."""
    img = l2_normalize(self.encode_image(images))
    txt = l2_normalize(self.encode_text(ids))
    logits = self.temperature() * img @ txt.T
    return logits, logits.T


def l2_normalize(x, axis=-1, eps=1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def create(config: CLIPConfig, seed: int = 0) -> CLIP:
  return CLIP(config, nnx.Rngs(seed))


def num_params(model: CLIP) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
