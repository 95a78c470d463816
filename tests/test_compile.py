"""negjax.compile on compile-only TPU devices (libtpu, from the [test] extra): the trainer's
step compiles for v5e:2x2 and v5p:2x2x2 with full FSDP within stated per-device memory, and
activations stay split over the batch: per-device temporaries follow the per-device batch,
not the global one. A sharding regression fails here instead of on a reserved pod."""
import functools
import importlib.util
import os

import numpy as np
import pytest

from negjax import compile as aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
PER_DEVICE = 16  # images per device in every compile below


def config(batch):
  spec = importlib.util.spec_from_file_location("negclip", os.path.join(ROOT, "configs",
                                                                        "negclip.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.arch, c.model.init, c.model.dtype = "negjax-tiny", "random", "bfloat16"
  c.mesh.data, c.mesh.fsdp = 1, -1  # full FSDP
  c.batch_size, c.data.text_length = batch, 8
  return c


@functools.cache
def compiled(topology):
  devices = aot.tpu_devices(topology)
  return aot.compile_step(config(PER_DEVICE * len(devices)), devices,
                          aot.chip_of(devices, topology), topology)


def state_bytes():
  """Parameters + AdamW's two moments, float32, whole (unsharded)."""
  params = aot.abstract_model(config(64))
  from flax import nnx
  n = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(nnx.state(params)))
  return 3 * 4 * n


@pytest.mark.parametrize("topology,devices,chip", [("v5e:2x2", 4, "v5e"),
                                                   ("v5p:2x2x2", 8, "v5p")])
def test_step_compiles_with_full_fsdp_within_bounds(topology, devices, chip):
  r = compiled(topology)
  assert (r["devices"], r["chip"], r["mesh"]) == (devices, chip, {"data": 1, "fsdp": devices})
  assert r["fits"] and r["hbm_bytes"] == aot.CHIPS[chip]["hbm_bytes"]
  # the state is split over the devices (replicated it would be `devices` times larger)
  batch = PER_DEVICE * (32 * 32 * 3 + 4 * (1 + 4 * 8 + 1))
  assert r["argument_bytes"] < 1.25 * state_bytes() / devices + batch
  assert r["temp_bytes"] < 40 * MiB and r["peak_bytes"] < 160 * MiB
  assert r["flops_per_step"] > 0 and r["compiler_flops_per_device"] > 0


def test_activations_follow_the_per_device_batch():
  """16 images per device on 4 and on 16 chips: were any activation kept for the global
  batch (as XLA did under FSDP before sharding.constrain_batch), the 16-chip program's
  temporaries would grow with its 4x larger global batch."""
  small, large = compiled("v5e:2x2"), compiled("v5e:4x4")
  assert large["batch_size"] == 4 * small["batch_size"]
  assert large["temp_bytes"] < 1.5 * small["temp_bytes"]


def test_tpu_flash_attention_matches_xla():
  """The padded, segment-masked Pallas kernel (run by Pallas's TPU interpreter on CPU)
  against XLA's attention: outputs and gradients, causal as the text tower uses it."""
  import jax
  import jax.numpy as jnp
  from jax.experimental.pallas import tpu as pltpu
  from negjax.models import layers
  q, k, v = (jax.random.normal(key, (2, 17, 2, 8)) for key in jax.random.split(
      jax.random.key(0), 3))
  loss = lambda f: lambda q, k, v: (f(q, k, v) ** 2).sum()
  ours = lambda q, k, v: layers._tpu_flash_attention(q, k, v, causal=True)
  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  with pltpu.force_tpu_interpret_mode():
    out = ours(q, k, v)
    grads = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(out, xla(q, k, v), atol=1e-5)
  for g, want in zip(grads, jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, want, atol=1e-5)
  assert float(jnp.abs(out).max()) > 0.1  # not all padding
