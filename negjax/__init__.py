"""negjax: NegBench evaluation and negation fine-tuning for CLIP, in JAX/Flax.

  model = negjax.load_model("ViT-B-32.pt")           # OpenAI / open_clip / HF / safetensors
  ids = negjax.tokenize(["a dog but no cat"])         # int32 [N, 77]
  img = negjax.preprocess(PIL.Image.open("x.jpg"), size=model.config.image_size)
  model.encode_image(img[None]), model.encode_text(ids)

A file that does not record its activation (or, for unregistered shapes, its attention
heads) needs `arch=` (or `heads=`, `quick_gelu=`): see `load_model`.
"""
from negjax import host_memory

host_memory.keep_freed_buffers()  # first: before JAX's threads allocate (see host_memory)

from negjax.models.weights import load_model, save_open_clip
from negjax.models.clip import CLIP, CLIPConfig
from negjax.image import open_image, preprocess
from negjax.tokenizer import tokenize

__all__ = ["CLIP", "CLIPConfig", "load_model", "open_image", "preprocess", "save_open_clip",
           "tokenize"]
