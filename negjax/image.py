"""CLIP eval-time image preprocessing in numpy/Pillow, matching open_clip.

Reproduces `open_clip.image_transform(size, is_train=False)` (torchvision
`Resize(size, BICUBIC)`, `CenterCrop(size)`, convert to RGB, `ToTensor`,
`Normalize(OPENAI_MEAN, OPENAI_STD)`) without torch, in the same order: the
resize runs in the image's own mode (so alpha is premultiplied and palette
images use nearest, as PIL does), and RGB conversion comes after the crop.
Output is channels-last float32 [size, size, 3], the layout the JAX model takes.

Video frames take another path, `preprocess_frame`: the official NegBench video transform
works on float tensors (torch's antialiased bicubic resize straight to size x size).
"""
import os
import threading
import warnings

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Images with more pixels than this are refused by `open_image` as likely
# decompression bombs. Set to None to disable the check (PIL's own hard limit
# of twice `PIL.Image.MAX_IMAGE_PIXELS` still applies).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# uint8 value -> normalised float32, per channel, computed in float32 the way
# ToTensor (x / 255) then Normalize ((x - mean) / std) compute it.
_LUT = ((np.arange(256, dtype=np.float32)[:, None] / np.float32(255)
         - np.asarray(OPENAI_MEAN, np.float32))
        / np.asarray(OPENAI_STD, np.float32)).astype(np.float32)
_CHANNELS = np.arange(3)

# warnings.catch_warnings swaps process-global state; serialise our own use.
_open_lock = threading.Lock()


def _resized_size(width, height, size):
  """torchvision's Resize(int) output (width, height): short side to `size`, long side floored."""
  if width <= height:
    return size, int(size * height / width)
  return int(size * width / height), size


def _center_crop(image, size):
  """torchvision's CenterCrop on a PIL image (zero padding if it is too small)."""
  width, height = image.size
  if width < size or height < size:
    pad_left = (size - width) // 2 if size > width else 0
    pad_top = (size - height) // 2 if size > height else 0
    canvas = Image.new(image.mode, (max(width, size), max(height, size)))
    if image.mode == "P":
      canvas.putpalette(image.getpalette())
    canvas.paste(image, (pad_left, pad_top))
    image = canvas
    width, height = image.size
    if width == size and height == size:
      return image
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def preprocess(image, size=224):
  """CLIP eval preprocessing of one image: float32 [size, size, 3], normalised.

  Args:
    image: a PIL image of any mode, or a uint8 array [H, W], [H, W, 1],
      [H, W, 3] (RGB) or [H, W, 4] (RGBA), e.g. an already-decoded frame.
    size: output side; the short side is resized to it, then centre-cropped.
  """
  if isinstance(image, np.ndarray):
    image = _pil_from_uint8(image)
  elif not isinstance(image, Image.Image):
    raise TypeError(f"expected a PIL image or uint8 array, got {type(image)}")
  width, height = image.size
  if width < 1 or height < 1:
    raise ValueError(f"image has no pixels: {image.size}")
  new_size = _resized_size(width, height, size)
  if new_size != (width, height):
    image = image.resize(new_size, Image.Resampling.BICUBIC)
  image = _center_crop(image, size)
  if image.mode != "RGB":
    image = image.convert("RGB")
  return _LUT[np.asarray(image), _CHANNELS]


def _pil_from_uint8(array):
  """Wraps a uint8 HW/HWC array as a PIL image so it takes the exact same path."""
  if array.dtype != np.uint8:
    raise TypeError(f"expected a uint8 array, got {array.dtype}")
  if array.ndim == 3 and array.shape[2] == 1:
    array = array[:, :, 0]
  if array.ndim == 2:
    return Image.fromarray(array, "L")
  if array.ndim == 3 and array.shape[2] in (3, 4):
    return Image.fromarray(np.ascontiguousarray(array), "RGB" if array.shape[2] == 3 else "RGBA")
  raise ValueError(f"expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {array.shape}")


def preprocess_uint8(array, size=224):
  """`preprocess` for an already-decoded uint8 image array (HW or HWC)."""
  return preprocess(np.asarray(array), size)


# ----------------------------------------------------------------- video frames


def _cubic(x):
  """Keys' cubic convolution kernel, a = -0.5 (torch's and PIL's bicubic), in float32."""
  x = np.abs(x).astype(np.float32)
  a = np.float32(-0.5)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0)).astype(np.float32)


def _resize_weights(in_size, out_size):
  """[out_size, in_size] float32 weights of torch's antialiased bicubic resize on one axis.

  The rule torch (and PIL) use: output pixel i is centred at (i + 0.5) * scale; when
  shrinking, the kernel is stretched by the scale so every input pixel counts; the taps
  are cut to the input and to [trunc(centre - support + 0.5), trunc(centre + support +
  0.5)); each row is normalised to sum 1 (that is also the border rule). The arithmetic
  is torch's for float32 images, step by step: its float32 centres are off by up to
  3e-5 at x = 300, which moves pixels by ~1e-5, more than the tolerance we test.
  """
  f32, f64 = np.float32, np.float64
  scale = f32(in_size) / f32(out_size)
  support = f32(2 * f64(scale)) if scale >= 1 else f32(2)
  invscale = f32(1 / f64(scale)) if scale >= 1 else f32(1)
  centre = (f64(scale) * (np.arange(out_size) + 0.5)).astype(f32)
  first = np.maximum(((centre - support).astype(f64) + 0.5).astype(np.int64), 0)
  stop = np.minimum(((centre + support).astype(f64) + 0.5).astype(np.int64), in_size)
  j = np.arange(in_size)
  x = ((j[None, :].astype(f32) - centre[:, None]).astype(f64) + 0.5) * f64(invscale)
  weights = np.where((j >= first[:, None]) & (j < stop[:, None]), _cubic(x), f32(0))
  return weights / weights.sum(1, keepdims=True, dtype=f32)


def resize_bicubic(x, height, width):
  """Float image [H, W, C] -> [height, width, C], as torch's
  `interpolate(mode="bicubic", antialias=True, align_corners=False)` on a float tensor:
  no clamping and no rounding, so values may overshoot [0, 1] near edges."""
  rows = _resize_weights(x.shape[0], height).astype(np.float64)  # [height, H]
  cols = _resize_weights(x.shape[1], width).astype(np.float64)  # [width, W]
  y = (rows @ x.reshape(x.shape[0], -1)).reshape(height, x.shape[1], -1)
  return np.matmul(cols, y).astype(np.float32)  # [height, width, C]


def preprocess_frame(frame, size=224):
  """A decoded video frame as the official NegBench video transform makes it, float32
  [size, size, 3]: uint8 -> float in [0, 1], antialiased bicubic resize of the float
  image to size x size, normalise.

  Unlike `preprocess` (images), the official video transform resizes to the model's
  (size, size) input directly (open_clip gives it the size as a pair, so the aspect ratio
  is not kept and its centre crop has nothing left to cut), and nothing is rounded back
  to uint8 after the resize.
  """
  frame = np.asarray(frame)
  if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
    raise ValueError(f"expected an RGB uint8 frame [H, W, 3], got {frame.dtype} {frame.shape}")
  x = frame.astype(np.float32) / np.float32(255)
  if x.shape[:2] != (size, size):  # torchvision returns the frame unchanged at that size
    x = resize_bicubic(x, size, size)
  mean, std = np.asarray(OPENAI_MEAN, np.float32), np.asarray(OPENAI_STD, np.float32)
  return (x - mean) / std


def _bomb_error(path, pixels, limit):
  return ValueError(
      f"{path}: image has {pixels} pixels, more than the limit of {limit} "
      "(possible decompression bomb; raise negjax.image.MAX_PIXELS if it is genuine)")


def open_image(path):
  """Opens and fully decodes an image file, with errors that name the file.

  Raises FileNotFoundError for a missing file and ValueError for a file that is
  truncated, not an image, or larger than MAX_PIXELS. The file is closed on
  return, so many images can be opened by long-running workers.
  """
  path = os.fspath(path)
  limit = MAX_PIXELS
  try:
    f = open(path, "rb")
  except FileNotFoundError:
    raise FileNotFoundError(f"image file not found: {path}") from None
  except OSError as e:
    raise ValueError(f"{path}: cannot read image file: {e}") from e
  with f:
    try:
      with _open_lock, warnings.catch_warnings():
        # PIL warns above its own limit; that is a refusal unless MAX_PIXELS
        # was raised past it (or disabled), in which case our check governs.
        pil_limit = Image.MAX_IMAGE_PIXELS
        raised = limit is None or (pil_limit is not None and limit > pil_limit)
        warnings.simplefilter("ignore" if raised else "error", Image.DecompressionBombWarning)
        image = Image.open(f)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
      # PIL's message carries the pixel count.
      raise ValueError(f"{path}: refused as a possible decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
      raise ValueError(f"{path}: not a recognised image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
      raise ValueError(f"{path}: cannot open image: {e}") from e
    width, height = image.size
    if limit is not None and width * height > limit:
      raise _bomb_error(path, width * height, limit)
    try:
      image.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ...
      raise ValueError(f"{path}: truncated or corrupt image: {e}") from e
  return image
