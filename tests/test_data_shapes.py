"""The shapes world: deterministic, well-formed scenes with exact object lists."""
import itertools
import math

import numpy as np

from negjax.data import shapes


def test_same_seed_same_image_and_objects():
  a, b = shapes.make(3, 0, 17), shapes.make(3, 0, 17)
  np.testing.assert_array_equal(a[0], b[0])
  assert a[1:] == b[1:]


def test_seed_split_and_index_change_the_image():
  base = shapes.make(0, 0, 5)[0]
  for other in (shapes.make(1, 0, 5), shapes.make(0, 1, 5), shapes.make(0, 0, 6)):
    assert not np.array_equal(base, other[0])


def test_vocabulary_is_8_shapes_by_6_colours():
  assert len(shapes.SHAPES) >= 8 and len(shapes.COLOURS) >= 6
  assert len(set(shapes.OBJECTS)) == len(shapes.SHAPES) * len(shapes.COLOURS)


def test_scenes_are_well_formed():
  counts = set()
  for index in range(150):
    scene = shapes.sample_scene(shapes.scene_rng(0, 0, index))
    names = [o.name for o in scene.objects]
    counts.add(len(names))
    assert 1 <= len(names) <= 4 and len(set(names)) == len(names)
    assert set(names).isdisjoint(scene.absent) and len(scene.absent) == 4
    assert set(scene.absent) <= set(shapes.OBJECTS)
    for o in scene.objects:  # inside the image, decent size at 64 px
      assert o.r * 64 >= 7 and o.r <= o.x <= 1 - o.r and o.r <= o.y <= 1 - o.r
    for p, q in itertools.combinations(scene.objects, 2):  # no overlap
      assert math.hypot(p.x - q.x, p.y - q.y) > p.r + q.r
  assert counts == {1, 2, 3, 4}


def test_absent_objects_are_mostly_hard():
  hard = total = 0
  for index in range(100):
    scene = shapes.sample_scene(shapes.scene_rng(0, 0, index))
    colours = {o.colour for o in scene.objects}
    kinds = {o.shape for o in scene.objects}
    for name in scene.absent:
      colour, shape = name.split(" ")
      hard += colour in colours or shape in kinds
      total += 1
  assert hard / total >= 0.5


def test_render_draws_objects_in_their_colour_and_size_is_configurable():
  scene = shapes.sample_scene(shapes.scene_rng(0, 0, 2))
  for size in (32, 64, 96):
    image = shapes.render(scene, size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
  image = shapes.render(scene, 64).astype(int)
  for o in scene.objects:
    if o.shape == "ring":
      continue  # the centre of a ring is background
    pixel = image[int(o.y * 64), int(o.x * 64)]
    assert np.abs(pixel - shapes.COLOURS[o.colour]).max() < 40, (o, pixel)
