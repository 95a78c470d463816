"""The shapes world: synthetic images whose exact object list is known.

Negation needs ground truth about what is *absent*, which real captions rarely give. Here
every image is drawn from a scene description, so present objects are exact and absent ones
can be chosen to be hard (same colour or same shape as something present). Objects are named
"<colour> <shape>" so captions read naturally. Everything is a pure function of
(seed, split, index): sharded generation gives the same images whatever the worker count.
"""
import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "heart")
OBJECTS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)

_SUPERSAMPLE = 4  # draw large, then downscale: anti-aliased edges at 64 px
_MAX_TILT = {"square": 15, "diamond": 15, "cross": 15}  # more would turn a square into a diamond


@dataclasses.dataclass(frozen=True)
class Object:
  colour: str
  shape: str
  x: float  # centre, as a fraction of the image side
  y: float
  r: float  # radius, as a fraction of the image side
  angle: float  # degrees

  @property
  def name(self):
    return f"{self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple  # of Object, distinct names
  background: tuple  # two RGB colours of a linear gradient
  gradient_angle: float
  noise_seed: int
  absent: tuple  # names of plausible objects not in the scene


def scene_rng(seed, split, index):
  """The generator for one scene; split keeps train and eval worlds disjoint."""
  return np.random.default_rng((seed, split, index, 0))


def sample_scene(rng, max_objects=4, num_absent=4):
  n = int(rng.integers(1, max_objects + 1))
  names = rng.choice(len(OBJECTS), size=n, replace=False)
  # Radii shrink with crowding so up to 4 objects fit without touching.
  r_lo, r_hi = {1: (0.17, 0.28), 2: (0.14, 0.22), 3: (0.13, 0.19), 4: (0.12, 0.17)}[n]
  placed = None
  for attempt in range(100):  # re-place the whole scene; radii shrink slowly if crowded
    placed = _place(names, rng, r_lo * 0.995 ** attempt, r_hi * 0.995 ** attempt)
    if placed:
      break
  else:  # pragma: no cover - with these radii a few attempts always suffice
    raise RuntimeError("could not place objects without overlap")
  # Muted, low-saturation backgrounds so every object colour stands out.
  grey = rng.uniform(70, 200, size=2)
  tint = rng.uniform(-18, 18, size=(2, 3))
  background = tuple(tuple(int(v) for v in np.clip(g + t, 0, 255)) for g, t in zip(grey, tint))
  present = [o.name for o in placed]
  return Scene(tuple(placed), background, float(rng.uniform(0, 360)),
               int(rng.integers(2**31)), plausible_absent(present, rng, num_absent))


def _place(names, rng, r_lo, r_hi, tries=30):
  """Non-overlapping objects with a margin, or None if this draw got too crowded."""
  placed = []
  for k in names:
    colour, shape = OBJECTS[k].split(" ")
    r = rng.uniform(r_lo, r_hi)
    for _ in range(tries):
      x, y = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
      if all(math.hypot(x - o.x, y - o.y) > r + o.r + 0.03 for o in placed):
        break
    else:
      return None
    tilt = _MAX_TILT.get(shape, 0 if shape in ("circle", "ring") else 25)
    placed.append(Object(colour, shape, float(x), float(y), float(r),
                         float(rng.uniform(-tilt, tilt))))
  return placed


def plausible_absent(present, rng, k):
  """Absent objects, half of them hard: sharing a colour or a shape with a present one."""
  colours = {p.split(" ")[0] for p in present}
  shapes = {p.split(" ")[1] for p in present}
  others = [o for o in OBJECTS if o not in present]
  hard = [o for o in others if o.split(" ")[0] in colours or o.split(" ")[1] in shapes]
  n_hard = min(len(hard), (k + 1) // 2)
  chosen = [hard[i] for i in rng.choice(len(hard), size=n_hard, replace=False)]
  rest = [o for o in others if o not in chosen]
  chosen += [rest[i] for i in rng.choice(len(rest), size=k - n_hard, replace=False)]
  return tuple(chosen)


def _outline(shape, cx, cy, r, angle):
  """Polygon vertices (or None for shapes drawn as ellipses)."""
  if shape in ("circle", "ring"):
    return None
  if shape == "square":
    pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
  elif shape == "diamond":
    pts = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
  elif shape == "triangle":
    pts = [(math.cos(t), math.sin(t)) for t in np.deg2rad([-90, 30, 150])]
  elif shape == "star":
    radii = np.tile([1.0, 0.42], 5)
    angles = np.deg2rad(np.arange(-90, 270, 36))
    pts = list(zip(radii * np.cos(angles), radii * np.sin(angles)))
  elif shape == "cross":
    a, b = 0.3, 0.95
    pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
           (-b, a), (-b, -a), (-a, -a)]
  elif shape == "heart":
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    hx = 16 * np.sin(t) ** 3
    hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = list(zip(hx / 17, (hy + 2.5) / 17))
  else:
    raise ValueError(f"unknown shape {shape!r}")
  c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
  return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render(scene, size=64):
  """Draws a scene as a (size, size, 3) uint8 image."""
  # Background: a linear gradient between two muted colours, plus faint noise.
  t = math.radians(scene.gradient_angle)
  u = np.linspace(-0.5, 0.5, size)
  ramp = np.clip(0.5 + math.cos(t) * u[None, :] + math.sin(t) * u[:, None], 0, 1)[..., None]
  c0, c1 = (np.asarray(c, np.float32) for c in scene.background)
  bg = c0 * (1 - ramp) + c1 * ramp
  bg += np.random.default_rng(scene.noise_seed).normal(0, 4, bg.shape)
  # Objects are drawn large on black with a coverage mask, then box-downscaled: the
  # small layer is colour x coverage, so blending is one multiply-add (no overlaps).
  big = size * _SUPERSAMPLE
  layer = Image.new("RGB", (big, big))
  mask = Image.new("L", (big, big), 0)
  draw, mdraw = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
  for o in scene.objects:
    cx, cy, r = o.x * big, o.y * big, o.r * big
    colour = COLOURS[o.colour]
    pts = _outline(o.shape, cx, cy, r, o.angle)
    if pts is None:
      box = (cx - r, cy - r, cx + r, cy + r)
      width = int(round(0.38 * r)) if o.shape == "ring" else 0
      if width:
        draw.ellipse(box, outline=colour, width=width)
        mdraw.ellipse(box, outline=255, width=width)
      else:
        draw.ellipse(box, fill=colour)
        mdraw.ellipse(box, fill=255)
    else:
      draw.polygon(pts, fill=colour)
      mdraw.polygon(pts, fill=255)
  fg = np.asarray(layer.reduce(_SUPERSAMPLE), np.float32)
  alpha = np.asarray(mask.reduce(_SUPERSAMPLE), np.float32)[..., None] / 255
  return np.clip(np.rint(bg * (1 - alpha) + fg), 0, 255).astype(np.uint8)


def make(seed, split, index, size=64, num_absent=4):
  """(image, present object names, absent object names) of one shapes-world image."""
  scene = sample_scene(scene_rng(seed, split, index), num_absent=num_absent)
  return render(scene, size), tuple(o.name for o in scene.objects), scene.absent
