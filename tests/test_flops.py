"""The analytic FLOP count used for MFU."""
from negjax import flops
from negjax.models import clip


def test_a_full_layer_is_the_standard_transformer_count():
  t, w = 50, 768  # 24 t w^2 + 4 t^2 w with a 4x MLP
  assert flops.layer_forward_flops(t, t, w, 4.0) == 24 * t * w * w + 4 * t * t * w


def test_pooled_towers_count_one_query_in_the_last_layer():
  c = clip.get_config("ViT-B-32")
  full = 12 * flops.layer_forward_flops(50, 50, 768, 4.0)
  pooled = flops.tower_forward_flops(50, 768, 12, 4.0)
  last = 2 * 50 * 768 * 2 * 768 + 2 * 768 * 768 * 2 + 2 * 2 * 768 * 3072 + 4 * 50 * 768
  assert pooled == full - flops.layer_forward_flops(50, 50, 768, 4.0) + last
  # ViT-B/32 at 224 px: the published ~4.4 G multiply-adds for an image (~2.9 G for a
  # 77-token text), less the pooled last layer's unneeded ones
  assert 8.0e9 < flops.image_forward_flops(c) < 8.8e9
  assert 5.2e9 < flops.text_forward_flops(c, 77) < 5.8e9
  per_image = flops.train_flops_per_image(c, [77] * 5)
  assert per_image == 3 * (flops.image_forward_flops(c) + 5 * flops.text_forward_flops(c, 77))
