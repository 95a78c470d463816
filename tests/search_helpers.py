"""Shared by the search tests: a folder of one-object shapes images whose content is known,
indexed with the shapes-CLIP that ships inside negjax."""
import os

import numpy as np
from PIL import Image

from negjax.data import shapes

SCENES = {  # file name -> objects in it
    "red_circle.png": ("red circle",),
    "red_circle_blue_square.png": ("red circle", "blue square"),
    "blue_square.png": ("blue square",),
    "sub/green_star.png": ("green star",),
    "yellow_triangle.png": ("yellow triangle",),
}


def render(names, seed=0):
  """A 64 px image of these objects on a plain grey gradient, side by side."""
  objects = []
  for i, name in enumerate(names):
    colour, shape = name.split(" ")
    x = (i + 1) / (len(names) + 1)
    objects.append(shapes.Object(colour, shape, x, 0.5, 0.3 / len(names) + 0.05, 0.0))
  scene = shapes.Scene(tuple(objects), ((130, 130, 130), (160, 160, 160)), 0.0, seed, ())
  return shapes.render(scene, 64)


def make_folder(folder):
  """Writes SCENES, a corrupt image and a non-image file; returns the folder."""
  for i, (name, objects) in enumerate(SCENES.items()):
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(render(objects, seed=i)).save(path)
  with open(os.path.join(folder, "broken.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n not really")
  with open(os.path.join(folder, "notes.txt"), "w") as f:
    f.write("not an image")
  return folder


def pixels(folder, name):
  return np.asarray(Image.open(os.path.join(folder, name)).convert("RGB"))
