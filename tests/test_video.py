"""Video embedding as the official NegBench code makes it: which frames it takes, how it
preprocesses each one, how it combines their embeddings. The references here are written
from the official code's definitions: its frame sampler in NumPy, and its video transform
(ConvertImageDtype, Resize to (size, size) with bicubic antialias, Normalize) with torch."""
import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from negjax import evaluate, image
from negjax.data import negbench
from negjax.models import clip


def official_indices(n, k=4):
  """The official uniform frame sampler: edges int(linspace(0, n - 1, k' + 1)) with
  k' = min(k, n), one frame at each rounded (half to even) midpoint."""
  k = min(k, n)
  edges = np.linspace(0, n - 1, k + 1).astype(int)
  return [int(np.round((a + b) / 2)) for a, b in zip(edges[:-1], edges[1:])]


def torch_frame(frame, size):
  """The official video transform of one uint8 frame, channels-last float32 out."""
  x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255
  x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
  mean = torch.tensor(image.OPENAI_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(image.OPENAI_STD).view(1, 3, 1, 1)
  return ((x - mean) / std)[0].permute(1, 2, 0).numpy()


def write_video(path, n, width=48, height=40, codec="mpeg4", seed=0):
  """n frames of coarse random blocks, each frame different."""
  rng = np.random.default_rng(seed)
  with av.open(str(path), "w") as out:
    stream = out.add_stream(codec, rate=10)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for _ in range(n):
      blocks = rng.integers(0, 256, (height // 8, width // 8, 3), np.uint8)
      img = np.kron(blocks, np.ones((8, 8, 1), np.uint8))
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return str(path)


def all_frames(path):
  with av.open(path) as container:
    return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_frame_indices_are_the_official_ones():
  assert negbench.frame_indices(31).tolist() == [4, 11, 18, 26]  # the example in the issue
  for n in [1, 2, 3, 4, 5, 8, 31, 100] + list(range(6, 400, 7)):
    assert negbench.frame_indices(n).tolist() == official_indices(n), n
    # and the official code itself: torch's linspace to int, torch.round
    t = torch.linspace(0, n - 1, min(4, n) + 1, dtype=torch.int)
    want = [int(torch.round((a + b) / 2)) for a, b in zip(t[:-1], t[1:])]
    assert negbench.frame_indices(n).tolist() == want, n
  assert len(negbench.frame_indices(2)) == 2 and len(negbench.frame_indices(3)) == 3


@pytest.mark.parametrize("h, w, out_h, out_w", [
    (240, 320, 224, 224),  # MSR-VTT frames, 4:3, squashed
    (17, 31, 224, 224),  # upsampling
    (224, 300, 224, 224),  # one axis unchanged
    (500, 60, 32, 32),  # strong downsampling, tall
    (7, 5, 3, 11),  # down on one axis, up on the other
    (1, 1, 4, 4),
])
def test_resize_matches_torch(h, w, out_h, out_w):
  x = np.random.default_rng(h * w).random((h, w, 3), np.float32)
  got = image.resize_bicubic(x, out_h, out_w)
  t = torch.from_numpy(x).permute(2, 0, 1)[None]
  want = F.interpolate(t, size=(out_h, out_w), mode="bicubic", antialias=True,
                       align_corners=False)[0].permute(1, 2, 0).numpy()
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("h, w", [(240, 320), (40, 48), (32, 32), (20, 64), (300, 30)])
def test_frame_preprocessing_matches_the_official_video_transform(h, w):
  frame = np.random.default_rng(h + w).integers(0, 256, (h, w, 3), np.uint8)
  got = image.preprocess_frame(frame, 32)
  assert got.shape == (32, 32, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, torch_frame(frame, 32), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 31])
@pytest.mark.parametrize("codec, ext", [("mpeg4", "mp4"), ("libx264", "mkv")])
def test_video_frames_are_the_official_frames(tmp_path, n, codec, ext):
  # mkv records no frame count, and x264 reorders frames: the count comes from packets
  path = write_video(tmp_path / f"clip.{ext}", n, codec=codec, seed=n)
  frames = all_frames(path)
  assert len(frames) == n
  got = negbench.video_frames(path)
  assert len(got) == min(4, n)
  for g, i in zip(got, official_indices(n)):
    np.testing.assert_array_equal(g, frames[i])


def test_frame_mean_normalises_each_frame_and_skips_padding():
  x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
  count = np.array([4, 2, 1], np.int32)
  got = np.asarray(evaluate.frame_mean(x, count))
  for b, c in enumerate(count):
    unit = x[b, :c] / np.linalg.norm(x[b, :c], axis=-1, keepdims=True)
    np.testing.assert_allclose(got[b], unit.mean(0), rtol=1e-5, atol=1e-6)


def test_video_embedding_end_to_end(tmp_path):
  """normalise(mean(normalise(f_i))) over the official frames, with the official transform,
  for a 31-frame clip and a 3-frame one (frames 0, 0, 2: three real frames, not four)."""
  model = clip.create(clip.get_config("negjax-tiny"), seed=1)
  size = model.config.image_size
  paths = [write_video(tmp_path / "long.mp4", 31, seed=1),
           write_video(tmp_path / "short.mp4", 3, seed=2)]
  feats, ok, skipped = evaluate.encode_media(evaluate.Encoders(model), paths, batch_size=2,
                                             frames=negbench.FRAMES_PER_VIDEO)
  assert ok.all() and not skipped
  for got, path in zip(feats, paths):
    frames = all_frames(path)
    pixels = np.stack([torch_frame(frames[i], size) for i in official_indices(len(frames))])
    emb = np.asarray(model.encode_image(pixels))
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    want = emb.mean(0)
    np.testing.assert_allclose(got / np.linalg.norm(got), want / np.linalg.norm(want),
                               rtol=1e-4, atol=1e-5)


_NO_TORCH = """
import sys
import numpy as np
from negjax import image
from negjax.data import negbench
frames = negbench.video_frames(sys.argv[1])
x = np.stack([image.preprocess_frame(f, 32) for f in frames])
print(x.shape)
"""


def test_video_path_works_without_torch(tmp_path, run_without_torch):
  path = write_video(tmp_path / "clip.mp4", 9)
  assert run_without_torch(_NO_TORCH, path).strip() == "(4, 32, 32, 3)"
