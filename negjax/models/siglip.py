"""SigLIP and SigLIP 2 (fixed resolution and NaFlex) in Flax NNX, with Hugging Face / big_vision
numerics.

The towers are those of transformers' `SiglipModel` and big_vision's two-tower SigLIP:
ViT without a class token (patch embedding with bias, learned positions), LayerNorm eps 1e-6,
tanh-approximated GELU, a final LayerNorm over all tokens and a multihead attention-pooling
(MAP) head; the text tower is a bidirectional (not causal) transformer whose output is taken
at the LAST position (the model was trained on texts padded to 64 tokens with EOS, so the
padding is read) followed by a linear head. Logits are exp(logit_scale) * cos + logit_bias.
The transformer blocks are the shared ones (`negjax.models.layers`); q/k/v are concatenated
into the block's qkv weight at import.

Inputs are part of the model, as for any SigLIP: `model.tokenize(texts)` (the checkpoint's
own SentencePiece or tokenizer.json file, padded to `context_length`) and
`model.image_transforms` (resize to size x size, mean/std 0.5). The evaluator uses both.

NaFlex (transformers' `Siglip2Model`): the processor resizes each image, keeping its aspect
ratio, to a grid of at most `max_num_patches` patches and pads the patch sequence to exactly
that many; the tower embeds the flattened patches with a linear layer, adds the learned
position grid resized to the image's patch grid, and masks the padding patches as keys in
every attention (blocks and MAP head). Every image thus has one static shape: a NaFlex
model's input is a "patch sheet", a float32 [S, S, 3] array (S = `config.image_size`) whose
flattened values are the padded patches followed by the patch grid (rows, cols) and zeros
(`to_sheet`), so it travels through the evaluator's fixed-shape image batches unchanged.

Supported checkpoints: Hugging Face `SiglipModel` folders (SigLIP, and the fixed-resolution
SigLIP 2 releases, which are `SiglipModel`s with a Gemma tokenizer), `Siglip2Model` (NaFlex)
folders and big_vision `.npz` two-tower SigLIP files (fixed resolution, and NaFlex given its
max_num_patches). Refused: vision towers without the MAP head.
"""
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from negjax.models.layers import ACTIVATIONS, MASKED_LOGIT, LayerNorm, Transformer
from negjax.models.weights import CheckpointError


class SigLIPError(CheckpointError):
  """A SigLIP checkpoint or tokenizer that cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
  """Architecture, then the checkpoint's tokenizer file, then numerics (not weights)."""
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  vision_mlp: int
  text_width: int
  text_layers: int
  text_heads: int
  text_mlp: int
  embed_dim: int
  context_length: int = 64
  vocab_size: int = 32000
  eps: float = 1e-6
  # The tokenizer file (spiece.model / tokenizer.json) and its settings; None: no tokenizer.
  tokenizer_file: str | None = None
  # NaFlex only (0 otherwise): patch slots per image (the processor's max_num_patches) and
  # the side of the learned position grid; image_size is then the patch sheet's side.
  max_num_patches: int = 0
  position_grid: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def replace(self, **kw) -> "SigLIPConfig":
    return dataclasses.replace(self, **kw)

  @property
  def architecture(self) -> dict:
    names = [f.name for f in dataclasses.fields(self)]
    arch = {n: getattr(self, n) for n in names[:names.index("eps") + 1]}
    if self.max_num_patches:
      arch.update(max_num_patches=self.max_num_patches, position_grid=self.position_grid)
    return arch

  def transformer(self, tower, causal, rngs):
    width, layers, heads, mlp = (getattr(self, f"{tower}_{k}")
                                 for k in ("width", "layers", "heads", "mlp"))
    # The block's hidden width is int(width * ratio); +0.5 keeps it exact for any mlp.
    return Transformer(width, layers, heads, (mlp + 0.5) / width, "gelu_tanh", causal, rngs,
                       dtype=self.dtype, param_dtype=self.param_dtype, scan=self.scan_layers,
                       remat=self.remat, eps=self.eps)


def sheet_side(max_num_patches, patch_size):
  """The side S of a NaFlex patch sheet: the least with S * S * 3 >= the padded patches'
  values (max_num_patches * patch_size**2 * 3) + the grid's 2."""
  return math.isqrt(max_num_patches * patch_size ** 2) + 1


def _siglip(image_size, patch, width, layers, heads, mlp, vocab=32000):
  """Both towers alike, as in the released SigLIP / SigLIP 2 (fixed resolution) models."""
  return SigLIPConfig(image_size=image_size, patch_size=patch, vision_width=width,
                      vision_layers=layers, vision_heads=heads, vision_mlp=mlp,
                      text_width=width, text_layers=layers, text_heads=heads, text_mlp=mlp,
                      embed_dim=width, vocab_size=vocab)


def _naflex(patch, width, layers, heads, mlp, position_grid=16, max_num_patches=256):
  """A NaFlex SigLIP 2 (Siglip2Model) with Gemma's vocabulary."""
  return _siglip(sheet_side(max_num_patches, patch), patch, width, layers, heads, mlp,
                 vocab=256000).replace(max_num_patches=max_num_patches,
                                       position_grid=position_grid)


# Released shapes (google/NAME on the Hugging Face hub; SigLIP 2's vocabulary is Gemma's 256k,
# big_vision README_siglip2.md), for benchmarks; loading reads the shapes from the file
# itself. "siglip-tiny" is for CPU tests.
ARCHITECTURES = {
    "siglip-base-patch16-224": _siglip(224, 16, 768, 12, 12, 3072),
    "siglip-so400m-patch14-384": _siglip(384, 14, 1152, 27, 16, 4304),
    "siglip2-base-patch16-224": _siglip(224, 16, 768, 12, 12, 3072, vocab=256000),
    "siglip2-base-patch16-naflex": _naflex(16, 768, 12, 12, 3072),

    "siglip-tiny": SigLIPConfig(image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                                vision_heads=2, vision_mlp=128, text_width=64, text_layers=2,
                                text_heads=2, text_mlp=128, embed_dim=64, context_length=16,
                                vocab_size=256),
}


def architecture_name(config: SigLIPConfig) -> str:
  """The released name (ARCHITECTURES) whose shapes these are, else one spelled from the
  shapes: FAMILY-wWIDTH-dDEPTH-pPATCH-SIZE, SIZE the image side or naflexN (patch slots);
  FAMILY siglip2 for NaFlex or Gemma's 256k vocabulary."""
  arch = config.architecture
  for name, known in ARCHITECTURES.items():
    if known.architecture == arch:
      return name
  family = "siglip2" if config.max_num_patches or config.vocab_size == 256000 else "siglip"
  size = (f"naflex{config.max_num_patches}" if config.max_num_patches
          else str(config.image_size))
  return (f"{family}-w{config.vision_width}-d{config.vision_layers}-p{config.patch_size}"
          f"-{size}")


def _linear(din, dout, c, rngs, std):
  return nnx.Linear(din, dout, kernel_init=nnx.initializers.normal(std), dtype=c.dtype,
                    param_dtype=c.param_dtype, rngs=rngs)


class MAPHead(nnx.Module):
  """Multihead attention pooling: a learned probe attends over all tokens (no residual
  into the attention, no LayerNorm before it), then probe + MLP(LayerNorm(probe)).

  With one query per head, the key and value projections fold away: a head's logits are
  x . (W_k q) + b_k . q and its output (sum_i p_i x_i) W_v + b_v (the weights p sum to 1),
  so no [B, N, 2w] keys and values are made: N w heads multiply-adds instead of 2 N w^2
  (So400m's 2-layer image encode ~6% faster on CPU; equal to the reference within fp32
  rounding, tests/test_siglip.py)."""

  def __init__(self, c: SigLIPConfig, rngs: nnx.Rngs):
    w = c.vision_width
    self.heads, self.activation = c.vision_heads, "gelu_tanh"
    self.probe = nnx.Param(jax.random.normal(rngs.params(), (w,), c.param_dtype) * w ** -0.5)
    self.q = _linear(w, w, c, rngs, w ** -0.5)
    self.kv = _linear(w, 2 * w, c, rngs, w ** -0.5)
    self.out = _linear(w, w, c, rngs, w ** -0.5)
    self.ln = LayerNorm(w, c.dtype, c.param_dtype, c.eps)
    self.fc = _linear(w, c.vision_mlp, c, rngs, w ** -0.5)
    self.proj = _linear(c.vision_mlp, w, c, rngs, c.vision_mlp ** -0.5)

  def __call__(self, x, lengths=None):
    """[B, N, w] -> [B, w]; `lengths` ([B]): each row's real tokens, a prefix (None: all)."""
    b, n, w = x.shape
    h = self.heads
    d = w // h
    q = self.q(self.probe[...].astype(x.dtype)).reshape(h, d)  # the same for every image
    kernel = self.kv.kernel[...].astype(x.dtype).reshape(w, 2, h, d)
    bias = self.kv.bias[...].astype(x.dtype).reshape(2, h, d)
    key_q = jnp.einsum("whd,hd->wh", kernel[:, 0], q)  # W_k q, per head
    logits = (jnp.einsum("bnw,wh->bnh", x, key_q, preferred_element_type=jnp.float32)
              + jnp.einsum("hd,hd->h", bias[0], q, preferred_element_type=jnp.float32))
    logits = logits * d ** -0.5
    if lengths is not None:
      real = jnp.arange(n)[None, :, None] < lengths[:, None, None]
      logits = jnp.where(real, logits, MASKED_LOGIT)
    p = jax.nn.softmax(logits, axis=1).astype(x.dtype)  # [B, N, heads]
    pooled = jnp.einsum("bnh,bnw->bhw", p, x)  # each head's weighted mean token
    attended = jnp.einsum("bhw,whd->bhd", pooled, kernel[:, 1]) + bias[1]
    y = self.out(attended.reshape(b, w))
    return y + self.proj(ACTIVATIONS[self.activation](self.fc(self.ln(y))))


class VisionTower(nnx.Module):
  """patches @ W + b + positions -> blocks -> LayerNorm -> MAP head. NaFlex: the patches
  and grid come from a patch sheet, the positions are resized to the grid and padding
  patches are masked."""

  def __init__(self, c: SigLIPConfig, rngs: nnx.Rngs):
    p, w = c.patch_size, c.vision_width
    grid = c.position_grid or c.image_size // c.patch_size
    self.patch_size, self.dtype, self.max_num_patches = p, c.dtype, c.max_num_patches
    # The patch conv as a matmul over (row, col, channel)-flattened patches.
    self.patch_embed = _linear(p * p * 3, w, c, rngs, (p * p * 3) ** -0.5)
    self.positional_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (grid * grid, w), c.param_dtype) * w ** -0.5)
    self.transformer = c.transformer("vision", False, rngs)
    self.ln_post = LayerNorm(w, c.dtype, c.param_dtype, c.eps)
    self.head = MAPHead(c, rngs)

  def __call__(self, images):
    if self.max_num_patches:
      patches, grid = from_sheet(images, self.max_num_patches, self.patch_size)
      positions = resize_positions(self.positional_embedding[...], grid, self.max_num_patches)
      x = self.patch_embed(patches.astype(self.dtype)) + positions.astype(self.dtype)
      lengths = grid[:, 0] * grid[:, 1]
      return self.head(self.ln_post(self.transformer(x, lengths=lengths)), lengths)
    p = self.patch_size
    b, h, w_img, ch = images.shape
    # a VALID conv drops the pixels past the last whole patch (So400m/14 at 384 px: 27 x 27)
    h, w_img = h // p * p, w_img // p * p
    images = images[:, :h, :w_img]
    patches = images.reshape(b, h // p, p, w_img // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (h // p) * (w_img // p), p * p * ch).astype(self.dtype)
    x = self.patch_embed(patches) + self.positional_embedding[...].astype(self.dtype)
    return self.head(self.ln_post(self.transformer(x)))


class TextTower(nnx.Module):
  """Bidirectional transformer over all `context_length` tokens, read at the last one."""

  def __init__(self, c: SigLIPConfig, rngs: nnx.Rngs):
    w = c.text_width
    self.dtype = c.dtype
    self.token_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (c.vocab_size, w), c.param_dtype) * 0.02)
    self.positional_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (c.context_length, w), c.param_dtype) * w ** -0.5)
    self.transformer = c.transformer("text", False, rngs)
    self.ln_final = LayerNorm(w, c.dtype, c.param_dtype, c.eps)
    self.head = _linear(w, c.embed_dim, c, rngs, w ** -0.5)

  def __call__(self, ids):
    b, n = ids.shape
    x = jnp.take(self.token_embedding[...], ids, axis=0).astype(self.dtype)
    x = x + self.positional_embedding[...].astype(self.dtype)
    last = jnp.full((b,), n - 1, jnp.int32)  # only the last token's output is needed
    return self.head(self.ln_final(self.transformer(x, pool=last)))


class SigLIP(nnx.Module):
  """Two towers, a learned temperature and a learned logit bias; features in float32."""

  def __init__(self, config: SigLIPConfig, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if config.embed_dim != config.vision_width:
      raise ValueError(f"SigLIP's image features are the vision width ({config.vision_width}); "
                       f"embed_dim {config.embed_dim} differs")
    self.config = config
    self.visual = VisionTower(config, rngs)
    self.text = TextTower(config, rngs)
    # big_vision's initial values: t = log(10), b = -10.
    self.logit_scale = nnx.Param(jnp.asarray(math.log(10.0), config.param_dtype))
    self.logit_bias = nnx.Param(jnp.asarray(-10.0, config.param_dtype))

  def encode_image(self, images):
    """float32 NHWC, preprocessed by `image_transforms` (NaFlex: patch sheets) ->
    unnormalised [N, embed_dim]."""
    images = jnp.asarray(images)
    size = self.config.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"encode_image: got images of shape {tuple(images.shape)}; this model "
                       f"takes [N, {size}, {size}, 3] (model.image_transforms)")
    if self.config.max_num_patches and not isinstance(images, jax.core.Tracer):
      check_sheets(images, self.config)
    return self.visual(images).astype(jnp.float32)

  def encode_text(self, ids):
    """int32 [N, context_length] ids from `tokenize` -> unnormalised [N, embed_dim]. The
    length is checked: the text tower reads its padding, so a shorter row gives other
    features."""
    ids = jnp.asarray(ids, jnp.int32)
    if ids.ndim != 2 or ids.shape[1] != self.config.context_length:
      raise ValueError(f"encode_text: got ids of shape {tuple(ids.shape)}; SigLIP takes "
                       f"[N, {self.config.context_length}] (model.tokenize pads to that)")
    return self.text(ids).astype(jnp.float32)

  def temperature(self):
    return jnp.exp(self.logit_scale[...].astype(jnp.float32))

  def bias(self):
    return self.logit_bias[...].astype(jnp.float32)

  def __call__(self, images, ids):
    """(logits_per_image [Ni, Nt], logits_per_text), as transformers' SiglipModel."""
    img, txt = (_l2(x) for x in (self.encode_image(images), self.encode_text(ids)))
    logits = self.temperature() * img @ txt.T + self.bias()
    return logits, logits.T

  def tokenize(self, texts):
    """Strings -> int32 [N, context_length], exactly as the checkpoint's transformers
    tokenizer with padding="max_length", max_length=context_length, truncation=True."""
    if self.config.tokenizer_file is None:
      raise SigLIPError("this SigLIP model has no tokenizer file (built without a checkpoint "
                        "folder); load it from a folder holding spiece.model or tokenizer.json")
    return get_tokenizer(self.config.tokenizer_file, self.config.context_length)(texts)

  @property
  def image_transforms(self):
    """(image preprocessing, video-frame preprocessing), functions of (input, size=): module
    functions (NaFlex: values), so they pickle for Grain workers and compare equal across
    SigLIP models of equal settings."""
    c = self.config
    if c.max_num_patches:
      naflex = NaFlexPreprocess(c.patch_size, c.max_num_patches)
      return naflex, naflex
    return preprocess, preprocess_frame


def _l2(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def create(config: SigLIPConfig, seed: int = 0) -> SigLIP:
  return SigLIP(config, nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------
# Images: transformers' SiglipImageProcessor (PIL bicubic resize to size x size, no crop,
# rescale 1/255, normalise with mean = std = 0.5).
# ---------------------------------------------------------------------------------------

def preprocess(image, size):
  """A PIL image (any mode) or uint8 array -> float32 [size, size, 3] in [-1, 1]."""
  return _unit_range(_rgb(image).resize((size, size), Image.BICUBIC))


def _rgb(image):
  """A PIL RGB image of a PIL image (any mode) or uint8 array; transparency over white, as
  transformers' convert_to_rgb."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  if image.mode != "RGB":
    white = Image.new("RGBA", image.size, (255, 255, 255))
    image = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
  return image


PIXEL_MEAN = PIXEL_STD = (0.5, 0.5, 0.5)  # after x / 255; what the train step normalises by


def _unit_range(image):
  """RGB uint8 -> float32 in [-1, 1]: rescale by 1/255, then PIXEL_MEAN = PIXEL_STD = 0.5."""
  return np.asarray(image, np.float32) / np.float32(255) / np.float32(0.5) - np.float32(1)


def preprocess_frame(frame, size):
  """A decoded RGB uint8 video frame -> float32 [size, size, 3], as `preprocess`."""
  return preprocess(np.asarray(frame, np.uint8), size)


# ---------------------------------------------------------------------------------------
# NaFlex images: transformers' Siglip2ImageProcessor (aspect-preserving PIL bilinear resize
# to at most max_num_patches patches, rescale 1/255, mean = std = 0.5, patches in (row,
# col, channel) order, padded with zero patches), packed into a patch sheet.
# ---------------------------------------------------------------------------------------

def naflex_size(height, width, patch_size, max_num_patches, eps=1e-5):
  """Siglip2ImageProcessor's target (height, width): each side times the largest scale
  (bisection on [eps / 10, 100] until the bracket is narrower than eps) for which the
  sides, rounded up to whole patches (at least one), give at most max_num_patches."""
  def side(scale, size):
    return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

  low, high = eps / 10, 100.0
  while high - low >= eps:
    scale = (low + high) / 2
    if side(scale, height) // patch_size * (side(scale, width) // patch_size) <= max_num_patches:
      low = scale
    else:
      high = scale
  return side(low, height), side(low, width)


def to_sheet(patches, grid, side):
  """Padded patches [max_num_patches, p * p * 3] and their grid (rows, cols) -> the patch
  sheet, float32 [side, side, 3]."""
  out = np.zeros(side * side * 3, np.float32)
  out[:patches.size] = np.asarray(patches, np.float32).reshape(-1)
  out[patches.size:patches.size + 2] = grid
  return out.reshape(side, side, 3)


def from_sheet(sheets, max_num_patches, patch_size):
  """Patch sheets [B, S, S, 3] -> (patches [B, max_num_patches, p * p * 3], grid [B, 2]
  int32). A grid below 1 x 1 (an all-zero sheet: a padding or unreadable item in an
  evaluation batch) is read as 1 x 1, so no row attends over nothing."""
  b, size = sheets.shape[0], max_num_patches * patch_size ** 2 * 3
  flat = sheets.reshape(b, -1)
  patches = flat[:, :size].reshape(b, max_num_patches, -1)
  grid = jnp.maximum(jnp.round(flat[:, size:size + 2]).astype(jnp.int32), 1)
  return patches, grid


def check_sheets(sheets, config):
  """Refuses arrays that are not patch sheets (e.g. plain images given to a NaFlex model):
  each grid must be whole numbers with 1 <= rows * cols <= max_num_patches and the values
  after it zero. All-zero sheets (evaluation padding) pass."""
  n, p = config.max_num_patches, config.patch_size
  flat = np.asarray(sheets).reshape(len(sheets), -1)
  grid, tail = flat[:, n * p * p * 3:n * p * p * 3 + 2], flat[:, n * p * p * 3 + 2:]
  blank = ~flat.any(axis=1)
  bad = ~blank & ((grid != np.round(grid)).any(1) | (grid < 1).any(1)
                  | (grid.prod(1) > n) | tail.any(1))
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"encode_image: image {i} is not a NaFlex patch sheet (grid "
                     f"{grid[i].tolist()}, max_num_patches {n}); make inputs with "
                     f"model.image_transforms or siglip.to_sheet")


def resize_positions(table, grid, length):
  """The learned position grid (table [G * G, w]) resized to each image's patch grid
  (grid [B, 2]) as transformers' Siglip2VisionEmbeddings does it, F.interpolate(bilinear,
  antialias=True, align_corners=False) written as weights: along each axis, output index i
  of n reads source j with weight max(0, 1 - |j - c| / max(G / n, 1)), c = (i + 0.5) G / n
  - 0.5, normalised to sum 1. Laid out as the image's patches in row-major order, padded
  to `length` slots with position (0, 0): float32 [B, length, w]."""
  g = math.isqrt(table.shape[0])
  sizes = grid.astype(jnp.float32)[:, None, :]  # [B, 1, 2]: rows, cols
  slot = jnp.arange(length, dtype=jnp.float32)[None, :, None]
  row = jnp.floor(slot / sizes[..., 1:])
  index = jnp.concatenate([row, slot - row * sizes[..., 1:]], axis=-1)  # [B, length, 2]
  index = jnp.where(slot < sizes.prod(-1, keepdims=True), index, 0)
  scale = g / sizes
  centre = (index + 0.5) * scale - 0.5
  source = jnp.arange(g, dtype=jnp.float32)
  weights = jnp.maximum(
      1 - jnp.abs(source - centre[..., None]) / jnp.maximum(scale, 1)[..., None], 0)
  weights = weights / weights.sum(-1, keepdims=True)  # [B, length, 2, G]
  weights = (weights[:, :, 0, :, None] * weights[:, :, 1, None, :]).reshape(
      grid.shape[0], length, g * g)
  return weights @ table.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class NaFlexPreprocess:
  """A NaFlex model's image (and video-frame) preprocessing: a PIL image (any mode) or
  uint8 array -> its patch sheet. Called as the evaluator calls `preprocess`, with
  size = the sheet's side; a value, so models with equal settings compare equal and share
  decoded images."""
  patch_size: int
  max_num_patches: int

  def __call__(self, image, size):
    p = self.patch_size
    image = _rgb(image)
    height, width = naflex_size(image.height, image.width, p, self.max_num_patches)
    pixels = _unit_range(image.resize((width, height), Image.BILINEAR))
    rows, cols = height // p, width // p
    patches = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(
        rows * cols, -1)
    padded = np.zeros((self.max_num_patches, patches.shape[1]), np.float32)
    padded[:len(patches)] = patches
    if size != sheet_side(self.max_num_patches, p):
      raise ValueError(f"NaFlex preprocessing: size {size} is not this model's patch sheet "
                       f"side {sheet_side(self.max_num_patches, p)} (config.image_size)")
    return to_sheet(padded, (rows, cols), size)


# ---------------------------------------------------------------------------------------
# Tokenizers, without torch.
# ---------------------------------------------------------------------------------------

TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text, lower=True):
  """big_vision's SigLIP text canonicalisation, which transformers' SiglipTokenizer applies:
  lower case, ASCII punctuation removed, whitespace runs made one space, stripped."""
  text = text.lower() if lower else text
  return re.sub(r"\s+", " ", text.translate(_NO_PUNCTUATION)).strip()


class SentencePieceTokenizer:
  """transformers' SiglipTokenizer on `spiece.model`: canonicalise, SentencePiece pieces
  (after a "▁" prefix, read behind an <unk> as transformers does), cut to length - 1, EOS,
  padded with the pad id. Literal special-token strings in a text ("</s>") are text here
  (canonicalisation removes their punctuation, as big_vision does); transformers alone
  would read them as the special token."""

  def __init__(self, path, length, settings):
    import sentencepiece
    self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.length = length
    self.lower = settings.get("do_lower_case", True)
    piece = lambda key, default: _token_text(settings.get(key, default))
    self.unk = piece("unk_token", "<unk>")
    self.eos_id, self.pad_id = (self._id(piece(key, "</s>"), path)
                                for key in ("eos_token", "pad_token"))
    self.unk_length = len(self.sp.encode(self.unk, out_type=str))

  def _id(self, token, path):
    i = self.sp.piece_to_id(token)
    if i == self.sp.unk_id() and token != self.unk:
      raise SigLIPError(f"{path}: has no piece {token!r} (needed as a special token)")
    return i

  def encode(self, text):
    text = canonicalize("▁" + text.replace("▁", " "), self.lower)
    pieces = self.sp.encode(self.unk + text, out_type=str)
    pieces = pieces[self.unk_length:] if len(pieces) >= self.unk_length else pieces
    return [self.sp.piece_to_id(p) for p in pieces]

  def __call__(self, texts):
    texts = [texts] if isinstance(texts, str) else texts
    out = np.full((len(texts), self.length), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = self.encode(text)[:self.length - 1] + [self.eos_id]
      out[row, :len(ids)] = ids
    return out


class HFTokenizer:
  """A `tokenizer.json` (e.g. SigLIP 2's Gemma tokenizer) via the `tokenizers` package, with
  transformers' max-length padding and truncation; its post-processor adds BOS/EOS as the
  file says. The padding side is tokenizer_config.json's, else transformers' class default
  (Gemma and Siglip2 tokenizers pad on the left: the last position, which the text tower
  reads, is then the text's own last token). Siglip2Tokenizer folders also lower-case, as
  transformers does for them."""

  def __init__(self, path, length, settings):
    from tokenizers import Tokenizer, normalizers
    self.tok = Tokenizer.from_file(path)
    if settings.get("tokenizer_class") == "Siglip2Tokenizer":
      norm = self.tok.normalizer
      self.tok.normalizer = normalizers.Sequence(
          [normalizers.Lowercase()] + ([norm] if norm is not None else []))
    pad = _token_text(settings.get("pad_token", "<pad>"))
    pad_id = self.tok.token_to_id(pad)
    if pad_id is None:
      raise SigLIPError(f"{path}: has no pad token {pad!r}")
    side = settings.get("padding_side",
                        _LEFT_PADDED.get(settings.get("tokenizer_class"), "right"))
    self.tok.no_padding()
    self.tok.enable_truncation(length)
    self.tok.enable_padding(direction=side, pad_id=pad_id, pad_token=pad, length=length)

  def __call__(self, texts):
    texts = [texts] if isinstance(texts, str) else list(texts)
    return np.asarray([e.ids for e in self.tok.encode_batch(texts)], np.int32)


# transformers 5's tokenizer classes that pad on the left unless tokenizer_config.json says
# otherwise (their class attribute padding_side).
_LEFT_PADDED = {"GemmaTokenizer": "left", "GemmaTokenizerFast": "left",
                "Siglip2Tokenizer": "left"}


def _token_text(token):
  return token["content"] if isinstance(token, dict) else str(token)


@functools.lru_cache(maxsize=8)
def get_tokenizer(path, length):
  """The tokenizer for a `spiece.model` or `tokenizer.json` file, with the settings of the
  `tokenizer_config.json` beside it (if any)."""
  if not os.path.exists(path):
    raise SigLIPError(f"{path}: tokenizer file missing")
  settings = {}
  cfg = os.path.join(os.path.dirname(path), "tokenizer_config.json")
  if os.path.exists(cfg):
    try:
      with open(cfg) as f:
        settings = json.load(f)
    except ValueError as e:
      raise SigLIPError(f"{cfg}: not readable JSON ({e})") from None
  if path.endswith(".json"):
    return HFTokenizer(path, length, settings)
  return SentencePieceTokenizer(path, length, settings)


def find_tokenizer(folder, model_type="siglip"):
  """The tokenizer file of a checkpoint folder: spiece.model (SigLIP) or tokenizer.json
  (SigLIP 2's Gemma tokenizer); an error names what is missing."""
  for name in TOKENIZER_FILES:
    path = os.path.join(folder, name)
    if os.path.exists(path):
      return path
  raise SigLIPError(
      f"{folder}: tokenizer file missing: expected {os.path.join(folder, 'spiece.model')} "
      f"(SigLIP's SentencePiece model) or {os.path.join(folder, 'tokenizer.json')} (SigLIP 2's "
      f"Gemma tokenizer); copy it from the checkpoint's Hugging Face repository")


# ---------------------------------------------------------------------------------------
# Checkpoints. The canonical form is transformers' SiglipModel state dict (NumPy, torch
# layouts); big_vision files are renamed into it first.
# ---------------------------------------------------------------------------------------

_BLOCK = [  # (our path inside a block, transformers suffix, transform)
    (("ln_1", "scale"), "layer_norm1.weight", None), (("ln_1", "bias"), "layer_norm1.bias", None),
    (("qkv", "kernel"), "self_attn.{q,k,v}_proj.weight", "T"),
    (("qkv", "bias"), "self_attn.{q,k,v}_proj.bias", None),
    (("out", "kernel"), "self_attn.out_proj.weight", "T"),
    (("out", "bias"), "self_attn.out_proj.bias", None),
    (("ln_2", "scale"), "layer_norm2.weight", None), (("ln_2", "bias"), "layer_norm2.bias", None),
    (("fc", "kernel"), "mlp.fc1.weight", "T"), (("fc", "bias"), "mlp.fc1.bias", None),
    (("proj", "kernel"), "mlp.fc2.weight", "T"), (("proj", "bias"), "mlp.fc2.bias", None),
]
_HEAD = "vision_model.head."


def _param_table(c: SigLIPConfig):
  """[(our path, transformers key(s), transform)] for every parameter."""
  v, t = "vision_model.", "text_model."
  table = [
      (("visual", "patch_embed", "kernel"), v + "embeddings.patch_embedding.weight", "conv"),
      (("visual", "patch_embed", "bias"), v + "embeddings.patch_embedding.bias", None),
      (("visual", "positional_embedding"), v + "embeddings.position_embedding.weight", None),
      (("visual", "ln_post", "scale"), v + "post_layernorm.weight", None),
      (("visual", "ln_post", "bias"), v + "post_layernorm.bias", None),
      (("visual", "head", "probe"), _HEAD + "probe", "probe"),
      (("visual", "head", "q", "kernel"), _HEAD + "attention.in_proj_weight", "q"),
      (("visual", "head", "q", "bias"), _HEAD + "attention.in_proj_bias", "q"),
      (("visual", "head", "kv", "kernel"), _HEAD + "attention.in_proj_weight", "kv"),
      (("visual", "head", "kv", "bias"), _HEAD + "attention.in_proj_bias", "kv"),
      (("visual", "head", "out", "kernel"), _HEAD + "attention.out_proj.weight", "T"),
      (("visual", "head", "out", "bias"), _HEAD + "attention.out_proj.bias", None),
      (("visual", "head", "ln", "scale"), _HEAD + "layernorm.weight", None),
      (("visual", "head", "ln", "bias"), _HEAD + "layernorm.bias", None),
      (("visual", "head", "fc", "kernel"), _HEAD + "mlp.fc1.weight", "T"),
      (("visual", "head", "fc", "bias"), _HEAD + "mlp.fc1.bias", None),
      (("visual", "head", "proj", "kernel"), _HEAD + "mlp.fc2.weight", "T"),
      (("visual", "head", "proj", "bias"), _HEAD + "mlp.fc2.bias", None),
      (("text", "token_embedding"), t + "embeddings.token_embedding.weight", None),
      (("text", "positional_embedding"), t + "embeddings.position_embedding.weight", None),
      (("text", "ln_final", "scale"), t + "final_layer_norm.weight", None),
      (("text", "ln_final", "bias"), t + "final_layer_norm.bias", None),
      (("text", "head", "kernel"), t + "head.weight", "T"),
      (("text", "head", "bias"), t + "head.bias", None),
      (("logit_scale",), "logit_scale", "scalar"),
      (("logit_bias",), "logit_bias", "scalar"),
  ]
  for tower, prefix, layers in (("visual", v, c.vision_layers), ("text", t, c.text_layers)):
    for path, suffix, transform in _BLOCK:
      keys = [f"{prefix}encoder.layers.{i}.{suffix}" for i in range(layers)]
      table.append(((tower, "transformer", "blocks") + path, keys, transform))
  return table


def _get(sd, key, transform, source, used):
  """One of our parameters from the canonical dict (q/k/v and MAP in_proj split/joined)."""
  if "{q,k,v}" in key:
    parts = [_get(sd, key.replace("{q,k,v}", n), None, source, used) for n in "qkv"]
    x = np.concatenate(parts, 0)
  else:
    if key not in sd:
      raise SigLIPError(f"{source}: missing key {key!r}")
    used.add(key)
    x = np.asarray(sd[key])
  if transform in ("q", "kv"):  # torch MultiheadAttention's packed in_proj: q, k, v rows
    w = x.shape[0] // 3
    x = x[:w] if transform == "q" else x[w:]
    return x.T if x.ndim == 2 else x
  if transform == "T":
    return x.T
  if transform == "conv":  # Conv2d [w, 3, p, p] -> [(p, p, 3), w]; Siglip2's Linear: [w, p*p*3]
    return x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0]) if x.ndim == 4 else x.T
  if transform == "probe":
    return x.reshape(-1)
  if transform == "scalar":
    return x.reshape(())
  return x


def from_state_dict(sd: dict, config: SigLIPConfig, source: str = "<state dict>") -> SigLIP:
  """A model from a transformers SiglipModel state dict; every key used, every shape right."""
  model = nnx.eval_shape(lambda: SigLIP(config, nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  used = set()
  for path, keys, transform in _param_table(config):
    var = params
    for p in path:
      var = var[p]
    shape = tuple(var.shape)
    if isinstance(keys, list):
      value = np.stack([_get(sd, k, transform, source, used) for k in keys])
    else:
      value = _get(sd, keys, transform, source, used)
    if value.shape != shape:
      raise SigLIPError(f"{source}: {keys if isinstance(keys, str) else keys[0]} gives shape "
                        f"{value.shape}, which does not fit {shape} for this architecture")
    var.set_value(jnp.asarray(value, config.param_dtype))
  extra = sorted(k for k in set(sd) - used if not k.endswith("position_ids"))
  if extra:
    raise SigLIPError(f"{source}: unexpected keys: {extra[:8]}{' …' if len(extra) > 8 else ''}")
  nnx.update(model, params)
  return model


def state_dict(model: SigLIP) -> dict:
  """Inverse of `from_state_dict` (float32 NumPy, transformers' names and layouts)."""
  params = nnx.state(model, nnx.Param)
  c, out = model.config, {}

  def put(key, x, transform):
    if "{q,k,v}" in key:
      for name, part in zip("qkv", np.split(x, 3, axis=0 if transform is None else 1)):
        put(key.replace("{q,k,v}", name), part, transform)
      return
    if transform == "T":
      x = x.T
    elif transform == "conv" and c.max_num_patches:  # Siglip2's Linear [w, p * p * 3]
      x = x.T
    elif transform == "conv":
      p = c.patch_size
      x = x.reshape(p, p, 3, -1).transpose(3, 2, 0, 1)
    elif transform == "probe":
      x = x.reshape(1, 1, -1)
    elif transform == "scalar":
      x = x.reshape(1)
    elif transform in ("q", "kv"):  # joined again below
      out.setdefault(key, {})[transform] = x.T if x.ndim == 2 else x
      return
    out[key] = np.array(x, np.float32, order="C")

  for path, keys, transform in _param_table(c):
    var = params
    for p in path:
      var = var[p]
    value = np.asarray(var[...], np.float32)
    for i, key in enumerate(keys if isinstance(keys, list) else [keys]):
      put(key, value[i] if isinstance(keys, list) else value, transform)
  for key in [k for k, v in out.items() if isinstance(v, dict)]:  # C order, as the others:
    out[key] = np.ascontiguousarray(np.concatenate([out[key]["q"], out[key]["kv"]], 0))
    # (joined transposed views come out in Fortran order, which safetensors would misread)
  return out


def _hf_config(path) -> tuple[str, SigLIPConfig]:
  """(model_type, architecture) from a transformers config.json; refuses what this module
  would run differently from transformers."""
  try:
    with open(path) as f:
      cfg = json.load(f)
    kind, text, vision = cfg.get("model_type"), cfg["text_config"], cfg["vision_config"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SigLIPError(f"{path}: not a readable SiglipModel config ({e})") from None
  if kind not in ("siglip", "siglip2"):
    raise SigLIPError(f"{path}: model_type {kind!r} is neither 'siglip' nor 'siglip2'")
  # transformers' SiglipConfig defaults where a file leaves a field out
  v = lambda k, d: vision.get(k, d)
  t = lambda k, d: text.get(k, d)
  for name, tower in (("vision", vision), ("text", text)):
    act = tower.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
      raise SigLIPError(f"{path}: {name}_config.hidden_act {act!r}; SigLIP uses "
                        f"'gelu_pytorch_tanh' and nothing else is implemented")
  if vision.get("vision_use_head", True) is not True:
    raise SigLIPError(f"{path}: vision_use_head false (no pooled image features); not supported")
  if v("num_channels", 3) != 3:
    raise SigLIPError(f"{path}: num_channels {v('num_channels', 3)}; only RGB is supported")
  eps = {v("layer_norm_eps", 1e-6), t("layer_norm_eps", 1e-6)}
  if len(eps) != 1:
    raise SigLIPError(f"{path}: the towers have different layer_norm_eps {sorted(eps)}")
  width, patch = v("hidden_size", 768), v("patch_size", 16)
  image_size, naflex = v("image_size", 224), {}
  if kind == "siglip2":
    grid = math.isqrt(v("num_patches", 256))
    if grid * grid != v("num_patches", 256):
      raise SigLIPError(f"{path}: vision_config.num_patches {v('num_patches', 256)} is not a "
                        f"square: the learned positions are a square grid")
    slots = _max_num_patches(os.path.join(os.path.dirname(path), "preprocessor_config.json"))
    naflex = dict(max_num_patches=slots, position_grid=grid)
    image_size = sheet_side(slots, patch)
  return kind, SigLIPConfig(
      **naflex, image_size=image_size, patch_size=patch, vision_width=width,
      vision_layers=v("num_hidden_layers", 12), vision_heads=v("num_attention_heads", 12),
      vision_mlp=v("intermediate_size", 3072), text_width=t("hidden_size", 768),
      text_layers=t("num_hidden_layers", 12), text_heads=t("num_attention_heads", 12),
      text_mlp=t("intermediate_size", 3072),
      embed_dim=t("projection_size", None) or t("hidden_size", 768),
      context_length=t("max_position_embeddings", 64), vocab_size=t("vocab_size", 32000),
      eps=eps.pop())


def _max_num_patches(path):
  """The processor's max_num_patches from a NaFlex folder's preprocessor_config.json;
  Siglip2ImageProcessor's default, 256, where the folder has no such file."""
  if not os.path.exists(path):
    return 256
  try:
    with open(path) as f:
      value = json.load(f).get("max_num_patches", 256)
  except (OSError, ValueError, AttributeError) as e:
    raise SigLIPError(f"{path}: not a readable preprocessor config ({e})") from None
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise SigLIPError(f"{path}: max_num_patches {value!r} is not a positive integer")
  return value


def is_siglip(path) -> bool:
  """Whether `path` is a file or folder this module loads (load_model's dispatch)."""
  path = str(path)
  if path.endswith(".npz"):
    return True
  cfg = os.path.join(path, "config.json")
  if os.path.isdir(path) and os.path.exists(cfg):
    try:
      with open(cfg) as f:
        return json.load(f).get("model_type") in ("siglip", "siglip2")
    except (OSError, ValueError, AttributeError):
      return False
  return False


def load(path, arch=None, *, heads=None, quick_gelu=None, allow_nonfinite=False, tokenizer=None,
         max_num_patches=None, **options) -> SigLIP:
  """A SigLIP from a transformers SiglipModel folder (config.json + model.safetensors, and
  spiece.model or tokenizer.json) or a big_vision .npz (architecture from its shapes; the
  tokenizer file given as `tokenizer=`, else looked for beside it; a NaFlex .npz also needs
  `max_num_patches`, a preprocessing setting the file does not hold, also given as
  arch="naflex:N", the form command lines take: `--config.arch=naflex:256`, `FILE=naflex:256`)."""
  from negjax.models import weights
  path = str(path)
  if arch is not None and path.endswith(".npz") and re.fullmatch(r"naflex:\d+", arch):
    # the command lines' `=arch` slot (what the file cannot say): "naflex:256"
    stated = int(arch.split(":")[1])
    if max_num_patches is not None and max_num_patches != stated:
      raise SigLIPError(f"{path}: arch={arch!r} and max_num_patches={max_num_patches} differ")
    arch, max_num_patches = None, stated
  npz_only = {"heads=": heads, "max_num_patches=": max_num_patches}
  if (arch, quick_gelu) != (None, None) or (
      not path.endswith(".npz") and any(v is not None for v in npz_only.values())):
    raise SigLIPError(f"{path}: arch=/quick_gelu= (and heads=/max_num_patches= outside .npz "
                      f"files) are not used for SigLIP checkpoints: the architecture comes "
                      f"from config.json (preprocessor_config.json) / the .npz shapes")
  if path.endswith(".npz"):
    sd = from_big_vision(_read_npz(path), path)
    config = infer_config(sd, path, heads, max_num_patches)
    folder = os.path.dirname(os.path.abspath(path))
  else:
    _, config = _hf_config(os.path.join(path, "config.json"))
    weights_file = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights_file):
      raise SigLIPError(f"{path}: model.safetensors missing (the weights of the folder)")
    sd, _ = weights._read_safetensors(weights_file)
    folder = path
  tokenizer = tokenizer or find_tokenizer(folder)
  get_tokenizer(tokenizer, config.context_length)  # a broken tokenizer file fails here
  weights.check_finite(sd.items(), path, allow_nonfinite)
  return from_state_dict(sd, config.replace(tokenizer_file=os.path.abspath(tokenizer), **options),
                         path)


def infer_config(sd, source, heads=None, max_num_patches=None) -> SigLIPConfig:
  """The architecture of a canonical state dict from its shapes; the head counts, which no
  shape shows, are `heads` (vision, text) or else big_vision's for the width (its ViT
  variants: S 6, B 12, L 16, So400m 16, H 16, g 16). A NaFlex state dict (a Linear patch
  embedding) needs `max_num_patches`, the patch slots per image: no weight shows it (big_vision
  passes it to its preprocessing; its README_siglip2 reports results at 256)."""
  def shape(key):
    if key not in sd:
      raise SigLIPError(f"{source}: missing key {key!r}")
    return np.shape(sd[key])

  def count(prefix):
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({int(m.group(1)) for k in sd if (m := pat.match(k))})

  embedding = shape("vision_model.embeddings.patch_embedding.weight")
  naflex = len(embedding) == 2  # Linear [w, p * p * 3]; else Conv2d [w, 3, p, p]
  width, patch = embedding[0], (math.isqrt(embedding[1] // 3) if naflex else embedding[2])
  if naflex and patch * patch * 3 != embedding[1]:
    raise SigLIPError(f"{source}: NaFlex patch embedding {embedding} does not take p * p * 3 "
                      f"values of RGB patches")
  if naflex and max_num_patches is None:
    raise SigLIPError(f"{source}: a NaFlex SigLIP 2 (patch embedding over flattened patches); "
                      f"its max_num_patches (patch slots per image: a preprocessing setting "
                      f"that the file does not hold) must be stated: "
                      f"load_model(path, max_num_patches=N)")
  if not naflex and max_num_patches is not None:
    raise SigLIPError(f"{source}: max_num_patches={max_num_patches} given, but this is a "
                      f"fixed-resolution SigLIP (convolutional patch embedding), not NaFlex")
  if naflex and (not isinstance(max_num_patches, int) or isinstance(max_num_patches, bool)
                 or max_num_patches < 1):
    raise SigLIPError(f"{source}: max_num_patches {max_num_patches!r} is not a positive integer")
  text_width = shape("text_model.final_layer_norm.weight")[0]
  if heads is None:
    heads = [_BIG_VISION_HEADS.get(w) for w in (width, text_width)]
  if None in heads:
    raise SigLIPError(f"{source}: widths {width}/{text_width} are not those of a big_vision ViT "
                      f"variant ({sorted(_BIG_VISION_HEADS)}), so the attention head count is "
                      f"unknown; pass heads=(VISION_HEADS, TEXT_HEADS)")
  grid = int(round(shape("vision_model.embeddings.position_embedding.weight")[0] ** 0.5))
  size = dict(image_size=grid * patch)
  if naflex:
    size = dict(image_size=sheet_side(max_num_patches, patch), max_num_patches=max_num_patches,
                position_grid=grid)
  return SigLIPConfig(
      **size, patch_size=patch, vision_width=width,
      vision_layers=count("vision_model.encoder.layers"), vision_heads=heads[0],
      vision_mlp=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
      text_width=text_width, text_layers=count("text_model.encoder.layers"),
      text_heads=heads[1], text_mlp=shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
      embed_dim=shape("text_model.head.weight")[0],
      context_length=shape("text_model.embeddings.position_embedding.weight")[0],
      vocab_size=shape("text_model.embeddings.token_embedding.weight")[0])


# big_vision vit.decode_variant: width -> heads (Ti 192, S 384, M 512, B 768, L 1024,
# So400m 1152, H 1280, g 1408, g-opt/G-opt 1536, G 1664, e 1792).
_BIG_VISION_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1152: 16, 1280: 16,
                     1408: 16, 1536: 16, 1664: 16, 1792: 16}


def _read_npz(path):
  import zipfile
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # e.g. a truncated file
    raise SigLIPError(f"{path}: not a readable .npz file ({e})") from None


def from_big_vision(params: dict, source: str) -> dict:
  """big_vision two-tower SigLIP parameters ("params/img/...", "/"-joined, per-layer
  `encoderblock_i` or scanned `encoderblock`) -> the transformers state dict (NaFlex
  image towers, proj.image_text.naflex_vit, -> Siglip2Model's)."""
  p = {k[len("params/"):] if k.startswith("params/") else k: np.asarray(v)
       for k, v in params.items()}
  if len(p) != len(params):  # "params/x" and "x": which one is meant?
    twice = sorted(k for k in params if k.startswith("params/") and k[len("params/"):] in params)
    raise SigLIPError(f"{source}: parameters stored both with and without 'params/': {twice[:4]}")
  sd, used = {}, set()

  def take(key):
    if key not in p:
      raise SigLIPError(f"{source}: missing big_vision parameter {key!r}")
    used.add(key)
    return p[key]

  dense = lambda k: take(k + "/kernel").T  # [in, out] -> [out, in]
  heads_in = lambda k: take(k + "/kernel").reshape(take(k + "/kernel").shape[0], -1).T
  heads_bias = lambda k: take(k + "/bias").reshape(-1)

  def attention(src, dst, packed=False):
    q, k, v = (heads_in(f"{src}/{n}") for n in ("query", "key", "value"))
    qb, kb, vb = (heads_bias(f"{src}/{n}") for n in ("query", "key", "value"))
    if packed:
      sd[dst + "in_proj_weight"] = np.concatenate([q, k, v])
      sd[dst + "in_proj_bias"] = np.concatenate([qb, kb, vb])
    else:
      for n, w, b in zip("qkv", (q, k, v), (qb, kb, vb)):
        sd[f"{dst}{n}_proj.weight"], sd[f"{dst}{n}_proj.bias"] = w, b
    out = take(f"{src}/out/kernel")
    sd[dst + "out_proj.weight"] = out.reshape(-1, out.shape[-1]).T
    sd[dst + "out_proj.bias"] = take(f"{src}/out/bias")

  def norm(src, dst):
    sd[dst + ".weight"], sd[dst + ".bias"] = take(src + "/scale"), take(src + "/bias")

  def mlp(src, dst):
    for i in (0, 1):
      sd[f"{dst}fc{i + 1}.weight"] = dense(f"{src}/Dense_{i}")
      sd[f"{dst}fc{i + 1}.bias"] = take(f"{src}/Dense_{i}/bias")

  def encoder(src, dst):
    scanned = any(k.startswith(src + "/encoderblock/") for k in p)
    if scanned:  # unstack the leading layer axis into encoderblock_i names
      for k in [k for k in p if k.startswith(src + "/encoderblock/")]:
        used.add(k)
        for i, x in enumerate(p[k]):
          p[k.replace("/encoderblock/", f"/encoderblock_{i}/")] = x
    block = re.compile(re.escape(src) + r"/encoderblock_(\d+)/")
    layers = len({m.group(1) for k in p if (m := block.match(k))})
    for i in range(layers):
      b, d = f"{src}/encoderblock_{i}", f"{dst}.encoder.layers.{i}."
      norm(b + "/LayerNorm_0", d + "layer_norm1")
      attention(b + "/MultiHeadDotProductAttention_0", d + "self_attn.")
      norm(b + "/LayerNorm_1", d + "layer_norm2")
      mlp(b + "/MlpBlock_0", d + "mlp.")

  kernel, pos = take("img/embedding/kernel"), take("img/pos_embedding")
  if kernel.ndim == 2:  # NaFlex (naflex_vit): a Dense over (row, col, channel) patches
    if pos.ndim != 3 or pos.shape[0] != pos.shape[1]:
      raise SigLIPError(f"{source}: NaFlex img/embedding/kernel {kernel.shape} (a Dense) but "
                        f"img/pos_embedding {pos.shape} is not a square [G, G, width] grid")
    sd["vision_model.embeddings.patch_embedding.weight"] = kernel.T  # Siglip2's Linear
  else:  # [p, p, 3, w] -> Conv2d [w, 3, p, p]
    sd["vision_model.embeddings.patch_embedding.weight"] = kernel.transpose(3, 2, 0, 1)
  sd["vision_model.embeddings.patch_embedding.bias"] = take("img/embedding/bias")
  # [1, G * G, w]; NaFlex [G, G, w] (rows, cols): both row-major, as transformers' table
  sd["vision_model.embeddings.position_embedding.weight"] = pos.reshape(-1, pos.shape[-1])
  encoder("img/Transformer", "vision_model")
  norm("img/Transformer/encoder_norm", "vision_model.post_layernorm")
  sd[_HEAD + "probe"] = take("img/MAPHead_0/probe")
  attention("img/MAPHead_0/MultiHeadDotProductAttention_0", _HEAD + "attention.", packed=True)
  norm("img/MAPHead_0/LayerNorm_0", _HEAD + "layernorm")
  mlp("img/MAPHead_0/MlpBlock_0", _HEAD + "mlp.")
  sd["text_model.embeddings.token_embedding.weight"] = take("txt/Embed_0/embedding")
  pos = take("txt/pos_embedding")
  sd["text_model.embeddings.position_embedding.weight"] = pos.reshape(-1, pos.shape[-1])
  encoder("txt/Encoder_0", "text_model")
  norm("txt/Encoder_0/encoder_norm", "text_model.final_layer_norm")
  sd["text_model.head.weight"] = dense("txt/head")
  sd["text_model.head.bias"] = take("txt/head/bias")
  sd["logit_scale"] = take("t").reshape(1)
  sd["logit_bias"] = take("b").reshape(1)
  extra = sorted(set(p) - used)
  if extra:
    raise SigLIPError(f"{source}: big_vision parameters not part of a SigLIP with a MAP head "
                      f"and no image head: {extra[:8]}{' …' if len(extra) > 8 else ''}")
  return sd


def hf_config_dict(c: SigLIPConfig) -> dict:
  """The transformers SiglipConfig (Siglip2Config for NaFlex) as keyword arguments of an
  architecture: for reference models in tests and benchmarks."""
  vision = dict(image_size=c.image_size) if not c.max_num_patches else dict(
      num_patches=c.position_grid ** 2)
  return dict(
      text_config=dict(hidden_size=c.text_width, intermediate_size=c.text_mlp,
                       num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads,
                       vocab_size=c.vocab_size, max_position_embeddings=c.context_length,
                       projection_size=c.embed_dim, layer_norm_eps=c.eps),
      vision_config=dict(hidden_size=c.vision_width, intermediate_size=c.vision_mlp,
                         num_hidden_layers=c.vision_layers, num_attention_heads=c.vision_heads,
                         patch_size=c.patch_size, layer_norm_eps=c.eps, **vision))


TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json")


def save_hf_folder(model: SigLIP, folder: str, dtype="float32") -> None:
  """Writes `model` as a transformers SiglipModel folder that `load` and
  `SiglipModel.from_pretrained` both read: model.safetensors (`state_dict`, float32 or e.g.
  float16), config.json (`hf_config_dict`) and the model's tokenizer file with the settings
  beside it. Written to a temporary folder beside `folder`, which then takes its place (a
  previous folder is moved aside first and removed after), so no reader sees half of one."""
  from safetensors.numpy import save_file
  c = model.config
  if c.max_num_patches:
    raise SigLIPError(f"{folder}: writing NaFlex (Siglip2Model) folders is not implemented")
  if c.tokenizer_file is None:
    raise SigLIPError(f"{folder}: the model has no tokenizer file to write beside its weights")
  folder = os.path.abspath(folder)
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise SigLIPError(f"{folder}: is a file; a SigLIP model is written as a folder")
  tmp, old = f"{folder}.tmp{os.getpid()}", f"{folder}.old{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    tensors = {k: v.astype(dtype) for k, v in state_dict(model).items()}
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump({"model_type": "siglip", "architectures": ["SiglipModel"], **hf_config_dict(c)},
                f, indent=1)
    name = "tokenizer.json" if c.tokenizer_file.endswith(".json") else "spiece.model"
    shutil.copyfile(c.tokenizer_file, os.path.join(tmp, name))
    for settings in TOKENIZER_SETTINGS:
      source = os.path.join(os.path.dirname(c.tokenizer_file), settings)
      if os.path.exists(source):
        shutil.copyfile(source, os.path.join(tmp, settings))
    if os.path.exists(folder):
      os.replace(folder, old)
    os.replace(tmp, folder)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
