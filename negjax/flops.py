"""Analytic FLOP counts of CLIP, for model FLOPs utilisation (MFU).

Counts matmul FLOPs only (2 per multiply-add): the projections, MLPs and attention score
and value products; a training step is 3x the forward (forward + two backward matmuls).
Only FLOPs the features need are counted: a pooled tower's last layer computes keys and
values for every token but the rest for its pooled token only.
"""
from negjax.models.clip import CLIPConfig


def layer_forward_flops(tokens: int, queries: int, width: int, mlp_ratio: float) -> float:
  """One block where `queries` of the `tokens` positions produce an output."""
  return (2 * tokens * width * 2 * width + 2 * queries * width * width  # k, v and q
          + 2 * queries * width * width  # attention output projection
          + 2 * 2 * queries * width * int(width * mlp_ratio)  # mlp in and out
          + 2 * 2 * queries * tokens * width)  # scores and weighted values


def tower_forward_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
  """A pooled tower: every position in all but the last layer, one query in the last."""
  return ((layers - 1) * layer_forward_flops(tokens, tokens, width, mlp_ratio)
          + layer_forward_flops(tokens, 1, width, mlp_ratio))


def image_forward_flops(c: CLIPConfig) -> float:
  patches = (c.image_size // c.patch_size) ** 2
  embed = 2 * patches * (c.patch_size ** 2 * 3) * c.vision_width
  head = 2 * c.vision_width * c.embed_dim
  return embed + tower_forward_flops(patches + 1, c.vision_width, c.vision_layers,
                                     c.vision_mlp_ratio) + head


def text_forward_flops(c: CLIPConfig, length: int) -> float:
  return tower_forward_flops(length, c.text_width, c.text_layers, c.text_mlp_ratio) + (
      2 * c.text_width * c.embed_dim)


def train_flops_per_image(c: CLIPConfig, text_lengths) -> float:
  """One image and its texts (caption + MCQ options) of these token lengths, forward and
  backward."""
  return 3 * (image_forward_flops(c) + sum(text_forward_flops(c, n) for n in text_lengths))
