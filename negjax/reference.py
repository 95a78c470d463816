"""The PyTorch reference (open_clip), imported safely, for parity tests and benchmarks.

Needs the `[test]` extra. The product itself never imports this module. In the `[test]`
venv a plain `import open_clip` fails (its torchvision does not match the CPU torch):
`negjax.reference.open_clip()` is the way to get open_clip there.
"""
import functools


@functools.cache
def open_clip():
  """Returns the `open_clip` module.

  The torchvision wheel that open_clip pulls in ships compiled ops built for another
  torch; its import fails unless the op schemas it registers kernels for already exist.
  Only its transforms are used here, so declaring the two schemas is enough.
  """
  import torch

  try:
    torch.ops.torchvision.nms  # already defined: a matching torchvision build
  except (AttributeError, RuntimeError):
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    open_clip._keepalive = lib  # a Library deregisters its ops when collected
  import open_clip as oc

  return oc
