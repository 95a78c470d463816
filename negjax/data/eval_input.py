"""Evaluation input: Grain decodes and preprocesses media into static-shape batches.

The item list is padded to a whole number of batches on every process, and each process
takes every `process_count`-th item, so all hosts run the same number of equal-shape
steps; padding items carry `valid=False` and are never counted. A file that cannot be
read comes back with `valid=False` and its error text, so the evaluator can list it;
a decompression bomb is flagged separately because it must stop the run.
"""
import math

import grain
import jax
import numpy as np

from negjax.data import negbench
from negjax.image import open_image, preprocess, preprocess_frame

OK, UNREADABLE, BOMB, PADDING = 0, 1, 2, 3


class LoadMedia(grain.transforms.Map):
  """Item index -> {"image": float32 [frames, size, size, 3], "frames" (how many of them
  are real: a clip shorter than `frames` has fewer, zero-padded), "index", "status",
  "error"}."""

  def __init__(self, paths, image_size, frames, transforms=None):
    self.paths = paths
    self.image_size = image_size
    self.frames = frames
    # The model's own (image, frame) preprocessing if it has one (SigLIP), else CLIP's.
    self.transforms = transforms or (preprocess, preprocess_frame)

  def map(self, index):
    shape = (self.frames, self.image_size, self.image_size, 3)
    out = {"index": np.int32(index), "status": np.int32(OK), "error": "", "frames": np.int32(0)}
    if index >= len(self.paths):
      out.update(image=np.zeros(shape, np.float32), status=np.int32(PADDING), index=np.int32(-1))
      return out
    path = self.paths[index]
    try:
      if negbench.is_video(path):  # the official video transform, not the image one
        pixels = [self.transforms[1](f, size=self.image_size)
                  for f in negbench.video_frames(path, self.frames)]
      else:
        pixels = [self.transforms[0](open_image(path), size=self.image_size)] * self.frames
      image = np.zeros(shape, np.float32)
      image[:len(pixels)] = pixels
      out.update(image=image, frames=np.int32(len(pixels)))
    except Exception as e:  # every reason a file cannot be used is reported, not raised here
      message = str(e) or type(e).__name__
      out.update(image=np.zeros(shape, np.float32), error=message,
                 status=np.int32(BOMB if "decompression bomb" in message else UNREADABLE))
    return out


def media_batches(paths, image_size, batch_size, frames=1, workers=0, transforms=None):
  """This process's batches of media; yields dicts of numpy arrays with leading
  dimension `batch_size` (per process). `frames` is 1 for images (a video still gets its
  own frames: use `negbench.FRAMES_PER_VIDEO` for video files). `transforms`: the model's
  (image, frame) preprocessing functions of (input, size=), where not CLIP's."""
  count, index = jax.process_count(), jax.process_index()
  steps = max(1, math.ceil(len(paths) / (batch_size * count)))
  ds = grain.MapDataset.range(steps * batch_size * count)[index::count]
  ds = ds.map(LoadMedia(list(paths), image_size, frames, transforms))
  ds = ds.batch(batch_size, drop_remainder=True)
  it = ds.to_iter_dataset()
  if workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it, steps


def text_batches(ids, batch_size):
  """Token ids [N, L] in static-shape batches; yields (ids [batch_size, L], n_valid)."""
  for start in range(0, max(len(ids), 1), batch_size):
    chunk = ids[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + ids.shape[1:], ids.dtype)])
    yield chunk, n
