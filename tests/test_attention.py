"""negjax's attention paths against jax.nn.dot_product_attention: the CPU loop
(layers._cpu_attention, used from CPU_LOOP_TOKENS tokens on) plain, causal, with key
lengths (NaFlex's padding patches) and per batch shard under a mesh; the TPU flash kernel
(Pallas's interpreter on CPU) with key lengths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from negjax import sharding
from negjax.models import layers

N = layers.CPU_LOOP_TOKENS + 5  # long enough for the loop, and not a multiple of anything


def inputs(b=8, heads=3, d=16, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((b, N, heads, d), np.float32)) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_loop_matches_dot_product_attention(causal, with_lengths):
  q, k, v = inputs()
  lengths = jnp.asarray([N, 1, 7, N - 1, 64, 100, 2, N]) if with_lengths else None
  got = jax.jit(lambda *a: layers.attention(*a, causal, lengths))(q, k, v)
  want = jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                      key_value_seq_lengths=lengths)
  assert jax.default_backend() == "cpu"
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6)
  if with_lengths:  # keys past a row's length do not matter
    noisy = k.at[1, 1:].set(100.0), v.at[1, 1:].set(-100.0)
    again = jax.jit(lambda *a: layers.attention(*a, causal, lengths))(q, *noisy)
    np.testing.assert_allclose(np.asarray(again), np.asarray(got), rtol=0, atol=1e-6)


def test_loop_runs_per_batch_shard_under_a_mesh():
  mesh = sharding.make_mesh(data=-1, fsdp=1)
  q, k, v = inputs(b=len(jax.devices()))
  lengths = jnp.arange(1, len(jax.devices()) + 1) * 9
  spec = NamedSharding(mesh, P(sharding.BATCH_AXES))
  fn = jax.jit(lambda q, k, v, lengths: layers.attention(q, k, v, False, lengths))
  with jax.set_mesh(mesh):
    args = [jax.device_put(x, spec) for x in (q, k, v, lengths)]
    text = fn.lower(*args).as_text()
    got = fn(*args)
  assert "shard_map" in text or "sdy.manual_computation" in text
  want = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6)


def test_tpu_flash_attention_masks_key_lengths():
  from jax.experimental.pallas import tpu as pltpu
  q, k, v = (x[:2, :17] for x in inputs())
  lengths = jnp.asarray([5, 17])
  with pltpu.force_tpu_interpret_mode():
    got = layers._tpu_flash_attention(q, k, v, False, lengths)
  want = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
  # padding queries (past a row's length) see only padding there: compare the real ones
  np.testing.assert_allclose(np.asarray(got[0, :5]), np.asarray(want[0, :5]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_cudnn_path_pads_odd_token_counts(causal, with_lengths):
  """The GPU path pads 197 / 77 tokens to an even count for cuDNN and masks the padding:
  checked here through XLA's implementation, values and gradients equal the unpadded."""
  n = 77
  q, k, v = (t[:4, :n] for t in inputs(b=4))
  lengths = jnp.asarray([n, 1, 40, n - 1]) if with_lengths else None

  def loss(fn, q, k, v):
    return (fn(q, k, v) ** 2).sum()

  padded = lambda q, k, v: layers._cudnn_attention(q, k, v, causal, lengths, "xla")
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                       key_value_seq_lengths=lengths)
  np.testing.assert_allclose(np.asarray(padded(q, k, v)), np.asarray(plain(q, k, v)),
                             rtol=0, atol=2e-6)
  got = jax.grad(lambda *a: loss(padded, *a), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=2e-5)
