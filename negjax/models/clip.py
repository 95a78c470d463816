"""CLIP in Flax NNX with open_clip's numerics: ViT image tower, causal text tower.

The same weights give the same features as open_clip's `CLIP` (pre-LN residual blocks,
class token, ln_pre/ln_post, bias-free projections, text pooled at the EOT token, which
is the largest id). Transformer layers are stored stacked (a leading layer axis) so one
parameter layout serves both the unrolled loop and `jax.lax.scan`.
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from negjax.models.layers import LayerNorm, Transformer


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Architecture plus numerics options; the fields after `quick_gelu` are not weights."""
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
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  # Numerics: compute dtype, parameter dtype, scan over layers, rematerialise layers.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def replace(self, **kw) -> "CLIPConfig":
    return dataclasses.replace(self, **kw)

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


def _vit(embed_dim, image_size, patch, width, layers, text_width, text_layers, heads=None):
  """A ViT CLIP; heads default to 64 wide, as in OpenAI's CLIP and most of open_clip's."""
  heads = heads or (width // 64, text_width // 64)
  return CLIPConfig(
      embed_dim=embed_dim, image_size=image_size, patch_size=patch, vision_width=width,
      vision_layers=layers, vision_heads=heads[0], text_width=text_width,
      text_layers=text_layers, text_heads=heads[1])


# open_clip's names. Every architecture also exists as NAME-quickgelu.
_BASE = {
    "ViT-B-32": _vit(512, 224, 32, 768, 12, 512, 12),
    "ViT-B-16": _vit(512, 224, 16, 768, 12, 512, 12),
    "ViT-L-14": _vit(768, 224, 14, 1024, 24, 768, 12),
    "ViT-L-14-336": _vit(768, 336, 14, 1024, 24, 768, 12),
    # open_clip 3.3.0 model_configs/ViT-H-14.json, ViT-H-16.json: vision width 1280, 32
    # layers, head_width 80 (16 heads); text width 1024, 24 layers, 16 heads; embed 1024.
    "ViT-H-14": _vit(1024, 224, 14, 1280, 32, 1024, 24, heads=(16, 16)),
    "ViT-H-16": _vit(1024, 224, 16, 1280, 32, 1024, 24, heads=(16, 16)),
    # Small enough for CPU tests: 32px images, two layers of two heads per tower.
    "negjax-tiny": _vit(64, 32, 8, 128, 2, 128, 2),
    # The shapes-CLIP that ships with negjax: 64px images, four layers per tower.
    "negjax-shapes": _vit(128, 64, 8, 128, 4, 128, 4),
}
ARCHITECTURES = dict(_BASE)
ARCHITECTURES.update(
    {f"{k}-quickgelu": v.replace(quick_gelu=True) for k, v in _BASE.items()})


def get_config(arch: str, **overrides) -> CLIPConfig:
  if arch not in ARCHITECTURES:
    raise ValueError(f"Unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
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


def same_shapes(shapes: dict) -> list[str]:
  """Registered names whose weights have these `weight_shapes` (the MLP compared by its
  hidden width, so that a ratio written as 4.3637 still matches)."""
  def key(s):
    return {**s, "mlp_ratio": round(s["vision_width"] * s["mlp_ratio"])}
  return [n for n, known in ARCHITECTURES.items() if key(weight_shapes(known)) == key(shapes)]


def open_clip_config(config: CLIPConfig) -> dict:
  """The model config JSON open_clip expects for this architecture."""
  cfg = {
      "embed_dim": config.embed_dim,
      "vision_cfg": {"image_size": config.image_size, "layers": config.vision_layers,
                     "width": config.vision_width, "patch_size": config.patch_size,
                     "head_width": config.vision_width // config.vision_heads,
                     "mlp_ratio": config.mlp_ratio},
      "text_cfg": {"context_length": config.context_length, "vocab_size": config.vocab_size,
                   "width": config.text_width, "heads": config.text_heads,
                   "layers": config.text_layers, "mlp_ratio": config.mlp_ratio},
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
    self.transformer = Transformer(w, c.vision_layers, c.vision_heads, c.mlp_ratio, c.activation,
                                   False, rngs, **c.transformer_options)
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
    self.transformer = Transformer(w, c.text_layers, c.text_heads, c.mlp_ratio, c.activation,
                                   True, rngs, **c.transformer_options)
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
