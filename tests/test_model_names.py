"""load_model's names: `openai:ARCH`, open_clip's `ARCH:PRETRAINED` and `hf:ORG/NAME`
resolve to local cache paths, and say exactly where a file goes when it is not there."""
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from negjax.models import clip, weights

CheckpointError = weights.CheckpointError


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setattr(weights, "CACHE_DIR", str(tmp_path / "negjax"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  return tmp_path


def test_open_clip_name_reads_the_cache_folder_and_names_the_architecture(cache):
  model = clip.create(clip.get_config("negjax-tiny"), seed=5)
  folder = cache / "negjax" / "open_clip" / "negjax-tiny" / "mine"
  folder.mkdir(parents=True)
  save_file(weights.state_dict(model), str(folder / "open_clip_model.safetensors"))
  assert weights.resolve("negjax-tiny:mine") == str(folder / "open_clip_model.safetensors")
  images = np.random.default_rng(0).standard_normal((1, 32, 32, 3), np.float32)
  gelu = weights.load_model("negjax-tiny:mine")  # a plain file: the name gives the activation
  assert clip.architecture_name(gelu.config) == "negjax-tiny"
  np.testing.assert_array_equal(np.asarray(gelu.encode_image(images)),
                                np.asarray(model.encode_image(images)))
  quick = weights.load_model("negjax-tiny-quickgelu:mine")  # same file, other activation
  assert clip.architecture_name(quick.config) == "negjax-tiny-quickgelu"


def test_missing_open_clip_weights_say_where_they_go(cache, monkeypatch):
  def offline(arch, tag, folder):
    raise weights._NoDownload("downloading it from laion/X failed (no network)")

  monkeypatch.setattr(weights, "_download_open_clip", offline)
  want = os.path.join(str(cache), "negjax", "open_clip", "ViT-H-14", "laion2b_s32b_b79k",
                      "open_clip_model.safetensors")
  with pytest.raises(CheckpointError, match=r"ViT-H-14:laion2b_s32b_b79k: not in the cache, "
                     r"and downloading it from laion/X failed \(no network\)\. Without a "
                     rf"network, put open_clip's weights file for it at {want} "):
    weights.load_model("ViT-H-14:laion2b_s32b_b79k")


def test_unknown_pretrained_tag_lists_near_tags(cache):
  pytest.importorskip("torch")
  with pytest.raises(CheckpointError, match=r"open_clip has no ViT-H-14 weights called "
                     r"'laion2b_s32b_b79'; did you mean laion2b_s32b_b79k\?"):
    weights.resolve("ViT-H-14:laion2b_s32b_b79")


def test_quickgelu_weights_named_as_gelu_are_refused(cache):
  with pytest.raises(CheckpointError, match=r"ViT-H-14:dfn5b: open_clip's dfn5b weights were "
                     r"trained with QuickGELU; name them ViT-H-14-quickgelu:dfn5b"):
    weights.resolve("ViT-H-14:dfn5b")
  with pytest.raises(CheckpointError, match="ViT-B-32-quickgelu:laion400m_e31"):
    weights.resolve("ViT-B-32:laion400m_e31")


def test_quickgelu_tags_are_open_clips():
  """QUICKGELU_TAGS against open_clip's own pretrained table, for every registered arch."""
  pytest.importorskip("torch")
  from negjax.reference import open_clip
  oc = open_clip()
  for arch, tag in oc.list_pretrained():
    if arch in clip.ARCHITECTURES and not arch.endswith("-quickgelu"):
      quick = bool(oc.pretrained.get_pretrained_cfg(arch, tag).get("quick_gelu"))
      listed = tag in weights.QUICKGELU_TAGS or f"{arch}:{tag}" in weights.QUICKGELU_TAGS
      assert quick == listed, (arch, tag)


def test_arch_openai_is_openais_file(cache):
  target = cache / "negjax" / "openai" / "ViT-B-32.pt"
  target.parent.mkdir(parents=True)
  target.write_bytes(b"")
  assert weights.resolve("ViT-B-32:openai") == weights.resolve("openai:ViT-B-32") == str(target)


def test_unknown_architecture_in_a_name_lists_near_names(cache):
  with pytest.raises(CheckpointError, match=r"ViT-H14:dfn5b: no such file, nor open_clip's "
                     r"ARCH:PRETRAINED: unknown architecture 'ViT-H14'; did you mean ViT-H-14"):
    weights.load_model("ViT-H14:dfn5b")


def test_existing_path_with_a_colon_is_a_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "run:3").write_bytes(b"")
  assert weights.resolve("run:3") == "run:3"


def test_hf_name_is_the_hub_cache_snapshot(cache):
  root = cache / "hub" / "models--org--clip-tiny"
  (root / "snapshots" / "abc123").mkdir(parents=True)
  (root / "snapshots" / "old").mkdir()
  (root / "refs").mkdir()
  (root / "refs" / "main").write_text("abc123")
  assert weights.resolve("hf:org/clip-tiny") == str(root / "snapshots" / "abc123")


def test_missing_hf_folder_says_where_it_goes(cache, monkeypatch):
  def offline(repo):
    raise weights._NoDownload("downloading it failed (no network)")

  monkeypatch.setattr(weights, "_download_hf", offline)
  want = os.path.join(str(cache), "hub", "models--google--siglip-base-patch16-224",
                      "snapshots", "main")
  with pytest.raises(CheckpointError, match=r"hf:google/siglip-base-patch16-224: not in the "
                     r"Hugging Face cache, and downloading it failed \(no network\)\. Without a "
                     rf"network, put the repository's files .* in {want}/"):
    weights.resolve("hf:google/siglip-base-patch16-224")
  with pytest.raises(CheckpointError, match="hf:ORG/NAME"):
    weights.resolve("hf:just-a-name")
