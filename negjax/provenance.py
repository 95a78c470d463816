"""Where a number came from: negjax version, checkpoint, architecture, dtype, data files, date.

results.json (evaluation) and the training report both carry `record(...)`, so a metric
can be traced back to the exact weights and files that produced it. File hashes are
SHA-256 of the content (a folder: of its files' relative paths and contents, in sorted
order), cached per (path, size, mtime) within a process so a rerun does not reread.
"""
import datetime
import functools
import hashlib
import os
import platform


def version() -> str:
  from importlib import metadata
  try:
    return metadata.version("negjax")
  except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    return "unknown"


def _stat_key(path):
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _file_sha256(path, size, mtime_ns):
  del size, mtime_ns  # cache key only
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def sha256(path: str) -> str:
  """Content hash of a file, or of a folder's files (names and contents, sorted)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    return _file_sha256(path, *_stat_key(path))
  digest = hashlib.sha256()
  for folder, dirs, names in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(names):
      full = os.path.join(folder, name)
      digest.update(os.path.relpath(full, path).encode() + b"\0")
      digest.update(_file_sha256(full, *_stat_key(full)).encode())
  return digest.hexdigest()


def size(path: str) -> int:
  if not os.path.isdir(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path)
             for n in names)


def file_record(path: str, rows: int | None = None) -> dict:
  """{"path", "bytes", "sha256"[, "rows"]} of one file or folder."""
  out = {"path": os.path.abspath(path), "bytes": size(path), "sha256": sha256(path)}
  if rows is not None:
    out["rows"] = int(rows)
  return out


def record(checkpoint: str | None = None, architecture: str | None = None,
           dtype: str | None = None, data: list | None = None, **extra) -> dict:
  """The provenance block: `data` is a list of `file_record`s (or paths)."""
  import jax
  out = {
      "negjax_version": version(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "host": platform.node(),
  }
  if checkpoint is not None:
    out["checkpoint"] = (file_record(checkpoint) if os.path.exists(checkpoint)
                         else {"path": checkpoint})
  if architecture is not None:
    out["architecture"] = architecture
  if dtype is not None:
    out["dtype"] = str(dtype)
  if data is not None:
    out["data"] = [d if isinstance(d, dict) else file_record(d) for d in data]
  out.update(extra)
  return out
