"""Analytic FLOP counts of CLIP, for model FLOPs utilisation (MFU).

Counts matmul FLOPs only (2 per multiply-add): the projections, MLPs and attention score
and value products; a training step is 3x the forward (forward + two backward matmuls).
"""
from negjax.models.clip import CLIPConfig


def tower_forward_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
  per_layer = (2 * tokens * width * 3 * width  # qkv
               + 2 * tokens * width * width  # attention output projection
               + 2 * 2 * tokens * width * int(width * mlp_ratio)  # mlp in and out
               + 2 * 2 * tokens * tokens * width)  # scores and weighted values
  return layers * per_layer


def image_forward_flops(c: CLIPConfig) -> float:
  patches = (c.image_size // c.patch_size) ** 2
  embed = 2 * patches * (c.patch_size ** 2 * 3) * c.vision_width
  head = 2 * c.vision_width * c.embed_dim
  return embed + tower_forward_flops(patches + 1, c.vision_width, c.vision_layers,
                                     c.mlp_ratio) + head


def text_forward_flops(c: CLIPConfig, length: int) -> float:
  return tower_forward_flops(length, c.text_width, c.text_layers, c.mlp_ratio) + (
      2 * c.text_width * c.embed_dim)


def train_flops_per_image(c: CLIPConfig, text_length: int, texts_per_image: int) -> float:
  """One image and its `texts_per_image` texts (caption + MCQ options), forward+backward."""
  return 3 * (image_forward_flops(c) + texts_per_image * text_forward_flops(c, text_length))
