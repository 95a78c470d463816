"""Device mesh, parameter partitioning and host-local -> global batches.

The mesh has two axes: `data` (pure data parallelism: parameters replicated) and `fsdp`
(data parallelism whose parameters and optimizer state are split across devices). The
batch is split over both. A parameter is split over `fsdp` along its largest dimension
that divides evenly; small ones stay replicated.
"""
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 2 ** 14  # parameters smaller than this stay replicated


def initialize_distributed() -> None:
  """Joins the other processes of a multi-host run when NEGJAX_DISTRIBUTED=1.

  On Cloud TPU VMs JAX finds its peers itself; elsewhere NEGJAX_COORDINATOR (host:port),
  NEGJAX_NUM_PROCESSES and NEGJAX_PROCESS_ID say where they are (launch/ has both cases).
  """
  if os.environ.get("NEGJAX_DISTRIBUTED") != "1":
    return
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if "NEGJAX_COORDINATOR" in os.environ:
    jax.distributed.initialize(os.environ["NEGJAX_COORDINATOR"],
                               int(os.environ["NEGJAX_NUM_PROCESSES"]),
                               int(os.environ["NEGJAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()


def process_0_says(flags):
  """Process 0's `flags` (a bool, or a sequence of them) on every process: for decisions
  read from the workdir, which other hosts may see differently (or not at all), and which
  all processes must share. Returns a bool, or a NumPy bool array for a sequence."""
  values = np.asarray(flags, np.int32)
  if jax.process_count() > 1 and values.size:
    from jax.experimental import multihost_utils
    values = np.asarray(multihost_utils.broadcast_one_to_all(values))
  return bool(values) if values.ndim == 0 else values > 0


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A (data, fsdp) mesh; one size may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("mesh: at most one of data and fsdp may be -1")
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f"mesh: data={data} x fsdp={fsdp} does not use the {n} devices exactly")
  grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def param_spec(shape, fsdp_size: int) -> P:
  """Splits the largest evenly divisible dimension over `fsdp`, if the array is large."""
  if fsdp_size == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: Mesh):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs), by `param_spec`."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree)


def batch_shards(mesh) -> int:
  """How many ways the batch is split: the product of the batch axes' sizes."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def constrain_batch(x):
  """`x` with its leading (batch) axis split over the batch axes of the current mesh.

  Under FSDP the parameters are split over `fsdp`, sometimes on a contracting dimension,
  and XLA's partitioner is then free to gather an activation's batch and split its features
  instead: every device holds global-batch activations (ViT-B-16 at v5e-256, batch 4096:
  10.1 GiB peak instead of 5.3). Pinning the batch axis keeps activations per device. A
  no-op outside a mesh context (`jax.set_mesh` / `jax.sharding.use_abstract_mesh`), on a
  mesh without the batch axes, or when the batch does not divide; numerics are unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  if batch_shards(mesh) == 1 or x.shape[0] % batch_shards(mesh):
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def platform() -> str:
  """The platform code is being traced for: the current mesh's devices (which may be
  compile-only TPU or GPU devices on a CPU host), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh.abstract_device.platform
  return jax.default_backend()


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(tree):
  """Global jax.Arrays -> their full values as NumPy on this process; process-local arrays ->
  concatenated over processes. On several hosts this is a collective: every process must call
  it."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)  # global arrays come back whole


def global_batch(local_batch, mesh: Mesh):
  """Host-local NumPy arrays (this process's slice of the batch) -> global jax.Arrays
  split over the batch axes; works unchanged on one host or many."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
