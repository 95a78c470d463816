"""negjax: NegBench evaluation and negation fine-tuning for CLIP, in JAX/Flax.

  model = negjax.load_model("ViT-B-32.pt")           # OpenAI / open_clip / HF / safetensors
  ids = negjax.tokenize(["a dog but no cat"])         # int32 [N, 77]
  img = negjax.preprocess(PIL.Image.open("x.jpg"))    # float32 [224, 224, 3]
  model.encode_image(img[None]), model.encode_text(ids)
"""
from negjax.models.checkpoints import load_model, save_open_clip
from negjax.models.clip import CLIP, CLIPConfig
from negjax.image import open_image, preprocess
from negjax.tokenizer import tokenize

__all__ = ["CLIP", "CLIPConfig", "load_model", "open_image", "preprocess", "save_open_clip",
           "tokenize"]
