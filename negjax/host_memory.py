"""Make glibc reuse XLA:CPU's freed buffers instead of giving them back to the kernel.

XLA:CPU allocates a program's temporaries as one block, with malloc, from a worker thread,
on every call. glibc serves a block that large (over 32 MB, or too large for a thread's
arena) with a fresh mmap and unmaps it on free, so each call faults the whole block in
again, page by page, zero-filled: a 2-layer SigLIP-base image encode of 4 images faults in
73 MB (18k pages) per call, ~10% of its time; torch's encode of the same, 0 pages.
One arena for all threads, no mmap and no trimming make glibc keep the block and hand it
out again. The cost: freed memory stays with the process (its resident size stays at its
peak), and threads share one malloc lock (XLA's threads allocate once per call).

The settings hold for arenas created after they are made, so negjax makes them on import,
before JAX starts its threads; `NEGJAX_HOST_MALLOC=system` leaves glibc's defaults. Not
glibc (macOS, musl): nothing is changed.
"""
import ctypes
import os

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP = {M_ARENA_MAX: 1, M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2 ** 31 - 1}

applied = False  # whether `keep_freed_buffers` changed glibc's settings in this process


def keep_freed_buffers() -> bool:
  """Apply KEEP with glibc's mallopt; True if it did (glibc, not opted out)."""
  global applied
  choice = os.environ.get("NEGJAX_HOST_MALLOC", "keep")
  if choice not in ("keep", "system"):
    raise ValueError(f"NEGJAX_HOST_MALLOC={choice!r}: use 'keep' (the default) or 'system'")
  if choice == "system":
    return False
  try:
    libc = ctypes.CDLL(None)  # the process itself: its C library is already loaded
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # glibc only: another libc's mallopt means other things
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  applied = all(mallopt(param, value) == 1 for param, value in KEEP.items())
  return applied
