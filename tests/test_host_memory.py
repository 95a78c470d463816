"""negjax.host_memory: XLA:CPU's per-call temporaries are reused, not faulted in again."""
import os
import subprocess
import sys

import pytest

# A jitted program whose temporaries and output (~100 MB: [4096, 3072] float32 arrays) are
# far over glibc's mmap threshold; prints the page faults of its 3rd..20th calls.
PROGRAM = """
import resource, sys
import negjax
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.tanh(jnp.tanh(x @ w) @ w.T) @ w)
x, w = jnp.ones((4096, 768)), jnp.full((768, 3072), 1e-3)
for _ in range(2):
  f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(18):
  f(x, w).block_until_ready()
print(negjax.host_memory.applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(env_value):
  env = dict(os.environ, NEGJAX_HOST_MALLOC=env_value, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env)
  assert p.returncode == 0, p.stderr[-2000:]
  applied, faults = p.stdout.split()[-2:]
  return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_repeated_calls_reuse_memory_instead_of_faulting_it_in():
  # glibc's defaults: every call maps its 48 MB blocks afresh (12k pages each)
  applied, system = run("system")
  assert not applied
  assert system > 18 * 10000, f"only {system} page faults in 18 calls with glibc's defaults"
  # negjax's settings: the heap still grows now and then while it settles (the order in
  # which XLA's threads free varies), but most calls fault nothing in
  applied, keep = run("keep")
  assert applied
  assert keep < 0.3 * system, f"{keep} page faults in 18 calls (glibc's defaults: {system})"


def test_unknown_setting_is_refused():
  env = dict(os.environ, NEGJAX_HOST_MALLOC="always")
  p = subprocess.run([sys.executable, "-c", "import negjax"], capture_output=True, text=True,
                     env=env)
  assert p.returncode != 0 and "NEGJAX_HOST_MALLOC='always'" in p.stderr
