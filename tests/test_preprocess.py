"""negjax.image.preprocess matches open_clip's eval transform; bad image files give errors naming the file."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from negjax import image as pp

SHAPES = [(1, 1), (1, 40), (40, 1), (7, 9), (31, 33), (32, 32), (224, 224), (225, 224),
          (224, 225), (300, 200), (200, 300), (337, 500), (700, 17)]
MODES = ["RGB", "L", "LA", "RGBA", "P", "PA", "CMYK", "I;16", "I", "F", "1", "YCbCr",
         "RGBX", "HSV"]


@pytest.fixture(scope="module")
def oc():
  from negjax.reference import open_clip
  module = open_clip()
  import torch
  # Per-image tensor ops are tiny; on a shared 2-core box torch's thread pool makes
  # each ~100x slower, so use one thread here and restore afterwards.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield module
  torch.set_num_threads(threads)


def _image(rng, width, height, mode):
  """Noise plus a smooth gradient, so both edges and flat areas are exercised."""
  noise = rng.integers(0, 256, (height, width, 4)).astype(np.float32)
  ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
  rgba = (0.5 * noise + 0.5 * ramp).astype(np.uint8)
  if mode == "I;16":
    wide = rgba[:, :, 0].astype(np.uint16) * 257 + rng.integers(0, 257, (height, width))
    return Image.fromarray(wide.astype(np.uint16))
  if mode in ("P", "PA"):
    image = Image.fromarray(rgba[:, :, 0], "P")
    image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    if mode == "PA":
      image = image.convert("PA")
      image.putalpha(Image.fromarray(rgba[:, :, 3], "L"))
    return image
  return Image.fromarray(rgba, "RGBA").convert(mode)


def _pixel_error(got, want):
  """Max abs difference in [0, 1] pixel units (undoing the normalisation)."""
  return float((np.abs(got - want) * np.asarray(pp.OPENAI_STD, np.float32)).max())


@pytest.mark.parametrize("size", [224, 336, 32])
@pytest.mark.parametrize("mode", MODES)
def test_matches_open_clip(oc, mode, size):
  transform = oc.image_transform(size, is_train=False)
  rng = np.random.default_rng(size)
  shapes = SHAPES if size != 336 else SHAPES[::2]
  for width, height in shapes:
    image = _image(rng, width, height, mode)
    assert image.mode == mode
    want = transform(image).numpy().transpose(1, 2, 0)
    got = pp.preprocess(image, size)
    assert got.dtype == np.float32 and got.shape == (size, size, 3)
    err = _pixel_error(got, want)
    assert err <= 1 / 255, (mode, width, height, size, err)


def test_constants_match_open_clip(oc):
  np.testing.assert_array_equal(pp.OPENAI_MEAN, oc.OPENAI_DATASET_MEAN)
  np.testing.assert_array_equal(pp.OPENAI_STD, oc.OPENAI_DATASET_STD)


@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_uint8_arrays(oc, channels):
  rng = np.random.default_rng(0)
  shape = (123, 77) if channels is None else (123, 77, channels)
  array = rng.integers(0, 256, shape, dtype=np.uint8)
  pil = Image.fromarray(array[..., 0] if channels == 1 else array)
  want = oc.image_transform(64, is_train=False)(pil).numpy().transpose(1, 2, 0)
  got = pp.preprocess_uint8(array, 64)
  assert _pixel_error(got, want) <= 1 / 255
  np.testing.assert_array_equal(pp.preprocess(array, 64), got)


def test_rejects_bad_arrays():
  with pytest.raises(TypeError, match="uint8"):
    pp.preprocess(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="shape|expected"):
    pp.preprocess(np.zeros((8, 8, 2), np.uint8))


def test_open_image_round_trip(oc, tmp_path):
  rng = np.random.default_rng(1)
  path = str(tmp_path / "ok.jpg")
  _image(rng, 250, 180, "RGB").save(path, quality=90)
  image = pp.open_image(path)
  want = oc.image_transform(224, is_train=False)(Image.open(path)).numpy().transpose(1, 2, 0)
  assert _pixel_error(pp.preprocess(image), want) <= 1 / 255


def test_missing_file(tmp_path):
  path = str(tmp_path / "nope.jpg")
  with pytest.raises(FileNotFoundError, match="nope.jpg"):
    pp.open_image(path)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated(tmp_path, fmt, keep):
  rng = np.random.default_rng(2)
  path = str(tmp_path / f"cut.{fmt}")
  _image(rng, 200, 150, "RGB").save(path, format=fmt)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:int(len(data) * keep)])
  with pytest.raises(ValueError, match="cut." + fmt):
    pp.open_image(path)


@pytest.mark.parametrize("content", [b"this is not an image\n", b""])
def test_not_an_image(tmp_path, content):
  path = str(tmp_path / "text.jpg")
  with open(path, "wb") as f:
    f.write(content)
  with pytest.raises(ValueError, match="text.jpg"):
    pp.open_image(path)


def test_directory(tmp_path):
  with pytest.raises(ValueError, match=str(tmp_path)):
    pp.open_image(tmp_path)


def _png_claiming(path, width, height):
  """A tiny valid PNG whose header then claims width x height: a decompression bomb."""
  Image.new("L", (8, 8)).save(path)
  data = bytearray(open(path, "rb").read())
  assert data[12:16] == b"IHDR"
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  with open(path, "wb") as f:
    f.write(data)


def test_bomb_file(tmp_path):
  path = str(tmp_path / "bomb.png")
  _png_claiming(path, 100_000, 100_000)
  with pytest.raises(ValueError, match=r"bomb\.png.*10000000000 pixels"):
    pp.open_image(path)


def test_bomb_limits(tmp_path, monkeypatch):
  """Our MAX_PIXELS, PIL's warning range and PIL's hard error all become clear errors."""
  rng = np.random.default_rng(3)
  paths = {}
  for side in (20, 40, 50):
    paths[side] = str(tmp_path / f"img{side}.png")
    _image(rng, side, side, "RGB").save(paths[side])
  monkeypatch.setattr(pp, "MAX_PIXELS", 1000)
  with pytest.raises(ValueError, match=r"img40\.png.*1600 pixels.*1000"):
    pp.open_image(paths[40])  # our own check
  assert pp.open_image(paths[20]).size == (20, 20)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  with pytest.raises(ValueError, match=r"img40\.png.*1600 pixels"):
    pp.open_image(paths[40])  # PIL's DecompressionBombWarning
  with pytest.raises(ValueError, match=r"img50\.png.*2500 pixels"):
    pp.open_image(paths[50])  # PIL's DecompressionBombError
  monkeypatch.setattr(pp, "MAX_PIXELS", 1_000_000)  # raised past PIL's: ours governs
  assert pp.open_image(paths[40]).size == (40, 40)


_NO_TORCH = r"""
import numpy as np
from negjax.image import open_image, preprocess
np.save(sys.argv[2], preprocess(open_image(sys.argv[1]), 32))
"""


def test_works_without_torch(tmp_path, run_without_torch):
  path = str(tmp_path / "x.png")
  _image(np.random.default_rng(4), 50, 40, "RGBA").save(path)
  out = str(tmp_path / "out.npy")
  run_without_torch(_NO_TORCH, path, out)
  np.testing.assert_array_equal(np.load(out), pp.preprocess(pp.open_image(path), 32))


def test_image_of_the_wrong_size_names_the_size_the_model_takes():
  """The packaged shapes-CLIP takes 64 px: a 224 px image is an error that says so, not a
  broadcast failure deep in the vision tower."""
  from negjax import train
  from negjax.models import weights
  model = weights.load_model(train.SHAPES_CHECKPOINT)
  image = pp.preprocess(Image.new("RGB", (300, 240), (200, 30, 30)), size=224)
  with pytest.raises(ValueError, match=r"shape \(1, 224, 224, 3\); this model takes "
                     r"\[N, 64, 64, 3\] \(preprocess\(image, size=64\)\)"):
    model.encode_image(image[None])
  right = pp.preprocess(Image.new("RGB", (300, 240), (200, 30, 30)), size=64)
  assert model.encode_image(right[None]).shape == (1, 128)
