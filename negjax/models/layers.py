"""Transformer building blocks shared by the model families (CLIP, SigLIP, ...).

Pre-LN residual blocks with parameters stacked on a leading layer axis, so that one layout
serves the unrolled loop and `jax.lax.scan`. Everything a family varies (widths, heads, MLP
width, activation, LayerNorm eps, causal mask) is an argument; no family config is read here.
"""
import contextlib

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from negjax import sharding

_ATTENTION = ["auto"]  # see use_attention


def _normal(std):
  return nnx.initializers.normal(stddev=std)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis (eps 1e-5 unless given; statistics in float32): normalise, then scale
  and shift. Unlike nnx.LayerNorm, XLA then keeps no broadcast copy of the scale for the
  backward pass (with the q/k/v split below, ~3% of a small CLIP's training step on CPU)."""

  def __init__(self, width, dtype, param_dtype, eps=1e-5):
    self.scale = nnx.Param(jnp.ones((width,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((width,), param_dtype))
    self.dtype, self.eps = dtype, eps

  def __call__(self, x):
    x = x.astype(jnp.float32)
    centred = x - x.mean(-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)
            + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class Block(nnx.Module):
  """Pre-LN residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, width, heads, mlp_ratio, layers, activation, dtype, param_dtype, rngs,
               eps=1e-5):
    if activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    self.heads = heads
    self.activation = activation
    hidden = int(width * mlp_ratio)
    attn_std, proj_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_1 = LayerNorm(width, dtype, param_dtype, eps)
    self.qkv = nnx.Linear(width, 3 * width, kernel_init=_normal(attn_std), **common)
    self.out = nnx.Linear(width, width, kernel_init=_normal(proj_std), **common)
    self.ln_2 = LayerNorm(width, dtype, param_dtype, eps)
    self.fc = nnx.Linear(width, hidden, kernel_init=_normal(fc_std), **common)
    self.proj = nnx.Linear(hidden, width, kernel_init=_normal(proj_std), **common)

  def __call__(self, x, causal: bool, pool=None, lengths=None):
    """[B, N, w] -> [B, N, w]; with `pool` ([B] positions), only those tokens' outputs,
    [B, w]: a pooled tower's last layer needs no other query, MLP or projection. With
    `lengths` ([B] int), only each row's first `lengths` tokens are attended to (the rest
    is padding, e.g. NaFlex's padding patches)."""
    b, n, w = x.shape
    heads = lambda t: t.reshape(b, t.shape[1], self.heads, w // self.heads)
    # split (not slice) q, k, v: the gradient is then one concatenate, not three pads + adds
    q, k, v = jnp.split(self.qkv(self.ln_1(x)), 3, axis=-1)
    if pool is None:
      attn = attention(heads(q), heads(k), heads(v), causal, lengths)
    else:
      at = lambda t: jnp.take_along_axis(t, pool[:, None, None], axis=1)  # [B, 1, w]
      q, x = at(q), at(x)
      mask = (jnp.arange(n)[None, :] <= pool[:, None])[:, None, None, :] if causal else None
      attn = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), mask=mask,
                                          key_value_seq_lengths=lengths)
    x = x + self.out(attn.reshape(b, -1, w))
    h = self.fc(self.ln_2(x))
    h = ACTIVATIONS[self.activation](h)
    x = x + self.proj(h)
    return x if pool is None else x[:, 0]


@contextlib.contextmanager
def use_attention(implementation: str):
  """Within this context, blocks traced use `implementation` for full attention: "auto"
  (the default: the platform's fused kernel where negjax has one) or "xla" (XLA's
  materialised softmax everywhere, e.g. to compare compiled memory)."""
  if implementation not in ("auto", "xla"):
    raise ValueError(f"attention implementation {implementation!r}: use 'auto' or 'xla'")
  _ATTENTION.append(implementation)
  try:
    yield
  finally:
    _ATTENTION.pop()


def attention(q, k, v, causal: bool, lengths=None):
  """Softmax attention over [B, N, heads, head_dim]; `lengths` ([B] int, or None: all) are
  the real keys of each row, a prefix. XLA's implementation keeps the float32
  probabilities [B, heads, N, N] of every layer for the backward pass (ViT-B-16: 412 MiB
  per device at 16 images); a fused kernel recomputes them blockwise instead. cuDNN's on
  GPU (16-bit inputs), the Pallas flash-attention kernel on TPU; on CPU, from
  `CPU_LOOP_TOKENS` tokens on, one (image, head) at a time (`_cpu_attention`), else
  jax.nn.dot_product_attention. The platform is the traced-for mesh's
  (`sharding.platform`), so compiling for a TPU slice on a CPU host picks TPU's."""
  kind = sharding.platform() if _ATTENTION[-1] == "auto" else "xla"
  if kind == "tpu":
    return _tpu_flash_attention(q, k, v, causal, lengths)
  if kind == "cpu" and q.shape[1] >= CPU_LOOP_TOKENS:
    return _cpu_attention(q, k, v, causal, lengths)
  if kind in ("gpu", "cuda") and q.dtype in (jnp.bfloat16, jnp.float16):
    return _cudnn_attention(q, k, v, causal, lengths)
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths)


def _cudnn_attention(q, k, v, causal, lengths=None, implementation="cudnn"):
  """cuDNN's fused attention. Its training kernel (jax 0.10.2) refuses an odd token count
  (ViT-B-16's 197, CLIP's 77 text tokens) at trace time, so tokens are padded to an even
  count, the padded keys masked through `lengths` and the padded queries sliced off.
  `implementation` is a parameter so the padding can be checked on CPU with "xla"."""
  b, n = q.shape[:2]
  if n % 2:
    pad = lambda t: jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0)))
    q, k, v = pad(q), pad(k), pad(v)
    lengths = (jnp.full((b,), n, jnp.int32) if lengths is None
               else jnp.minimum(lengths, n).astype(jnp.int32))
  out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation,
                                     key_value_seq_lengths=lengths)
  return out[:, :n]


def _tpu_flash_attention(q, k, v, causal, lengths=None, block=128):
  """Pallas flash attention (jax.experimental.pallas.ops.tpu). Tokens are padded to a
  multiple of the kernel's block; padding (this and the caller's, past `lengths`) gets its
  own segment id, so real queries never see it."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  b, n, _, d = q.shape
  padded = -(-n // block) * block
  to_kernel = lambda t: jnp.pad(t, ((0, 0), (0, padded - n), (0, 0), (0, 0))).transpose(
      0, 2, 1, 3)  # [B, heads, padded, d]
  real = jnp.full((b,), n) if lengths is None else jnp.minimum(lengths, n)
  segments = (jnp.arange(padded)[None] < real[:, None]).astype(jnp.int32)
  sizes = fa.BlockSizes(
      block_q=block, block_k_major=block, block_k=block, block_b=1,
      block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
      block_k_major_dq=block, block_k_dq=block, block_q_dq=block)

  def kernel(q, k, v, segments):
    ids = fa.SegmentIds(q=segments, kv=segments)
    return fa.flash_attention(q, k, v, segment_ids=ids, causal=causal, sm_scale=d ** -0.5,
                              block_sizes=sizes)

  out = _per_batch_shard(kernel, b, 4)(to_kernel(q), to_kernel(k), to_kernel(v), segments)
  return out.transpose(0, 2, 1, 3)[:, :n]


# From this many tokens on, CPU attention loops over (image, head) pairs. Measured on one
# core, [B, N, heads, 64] fp32, forward (forward + backward) vs jax.nn.dot_product_attention:
# N 50 1.05x (1.10x), 77 1.58x (1.10x), 197 1.56x (1.41x), 257 3.5x (1.7x), 729 3.5x (2.4x);
# but 0.6x at N 50 forward on two threads, where the batched matmuls use both cores.
CPU_LOOP_TOKENS = 128

# The logit a masked key gets where negjax masks by hand: jax.nn.dot_product_attention's
# own fill value, so the hand-written paths give its numbers.
MASKED_LOGIT = -0.7 * jnp.finfo(jnp.float32).max


def _cpu_attention(q, k, v, causal, lengths):
  """Attention on CPU one (batch row, head) at a time (`lax.map`): XLA:CPU otherwise
  writes the [B, heads, N, N] scores and probabilities to memory and reads them back in
  several passes, while one head's [N, N] block stays in cache (So400m at 384 px, [4, 729,
  16, 72]: 0.29 s vs 0.96 s, torch's fused kernel 0.28 s). The numerics are
  jax.nn.dot_product_attention's: float32 logits, scaled after the dot, softmax, cast to
  the value dtype."""
  def loop(q, k, v, real):
    b, n, h, d = q.shape
    heads = lambda t: t.transpose(0, 2, 1, 3).reshape(b * h, n, d)
    causal_keep = jnp.tril(jnp.ones((n, n), bool))

    def one(args):
      q, k, v, real = args
      logits = jnp.einsum("qd,kd->qk", q, k, preferred_element_type=jnp.float32) * d ** -0.5
      keep = jnp.arange(n)[None, :] < real
      keep = keep & causal_keep if causal else keep
      logits = jnp.where(keep, logits, MASKED_LOGIT)
      return jax.nn.softmax(logits, axis=-1).astype(v.dtype) @ v

    out = jax.lax.map(one, (heads(q), heads(k), heads(v), jnp.repeat(real, h)))
    return out.reshape(b, h, n, d).transpose(0, 2, 1, 3)

  b, n = q.shape[:2]
  real = jnp.full((b,), n, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  return _per_batch_shard(loop, b, 4)(q, k, v, real)


def _per_batch_shard(kernel, b, args):
  """`kernel` (of `args` arrays, batch first) run per batch shard in `jax.shard_map` under
  a mesh that splits the batch: XLA's partitioner does not split a Pallas call, and would
  gather the batch for a loop over it. As it is without such a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and set(sharding.BATCH_AXES) <= set(mesh.axis_names) and (
      b % sharding.batch_shards(mesh) == 0):
    batch = P(sharding.BATCH_AXES)
    return jax.shard_map(kernel, in_specs=(batch,) * args, out_specs=batch, check_vma=False)
  return kernel


def gelu(x):
  """Exact (erf) GELU, as torch's nn.GELU. Written with erf: jax.nn.gelu's erfc form
  costs XLA:CPU three extra elementwise passes, ~12% of a small CLIP's training step."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * 2 ** -0.5))


def quick_gelu(x):
  """OpenAI CLIP's sigmoid approximation of GELU."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu_tanh(x):
  """The tanh approximation of GELU (torch's gelu(approximate="tanh"))."""
  return jax.nn.gelu(x, approximate=True)


# The MLP activations a block may use, by the name configs and checkpoints record.
ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh}


class Transformer(nnx.Module):
  """`layers` blocks whose parameters carry a leading layer axis."""

  def __init__(self, width, layers, heads, mlp_ratio, activation, causal: bool, rngs, *,
               dtype, param_dtype, scan=False, remat=False, eps=1e-5):
    self.causal = causal
    self.scan = scan
    self.remat = remat
    self.layers = layers
    make = lambda: Block(width, heads, mlp_ratio, layers, activation, dtype, param_dtype, rngs,
                         eps)
    graphdef, first = nnx.split(make())
    states = [first] + [nnx.state(make()) for _ in range(layers - 1)]
    self.blocks = nnx.merge(graphdef, jax.tree.map(lambda *a: jnp.stack(a), *states))

  def __call__(self, x, pool=None, lengths=None):
    """All tokens' outputs, or with `pool` ([B] positions) only those, [B, w]. `lengths`:
    see Block."""
    graphdef, stacked = nnx.split(self.blocks)

    def layer(x, state, pool=None):  # each layer's output stays split over the batch
      return sharding.constrain_batch(nnx.merge(graphdef, state)(x, self.causal, pool,
                                                                 lengths))

    if self.remat:
      layer = jax.checkpoint(layer)
    x = sharding.constrain_batch(x)  # the tower's input too (see sharding.constrain_batch)
    full = self.layers if pool is None else self.layers - 1  # layers run on every token
    if self.scan and full:
      x, _ = jax.lax.scan(lambda c, s: (layer(c, s), None), x,
                          jax.tree.map(lambda a: a[:full], stacked))
    else:
      for i in range(full):
        x = layer(x, jax.tree.map(lambda a: a[i], stacked))
    if pool is not None:
      x = layer(x, jax.tree.map(lambda a: a[-1], stacked), pool)
    return x
