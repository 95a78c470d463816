"""Files written whole or not at all: a reader, or a crash, never sees half a file.

Each write goes to a temporary file beside the target (same filesystem), which then
replaces the target in one rename.
"""
import json
import os


def write(path: str, write_to, newline=None, binary=False) -> None:
  """Calls `write_to(f)` on a new text (or `binary`) file that then replaces `path`."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with (open(tmp, "wb") if binary else open(tmp, "w", newline=newline)) as f:
      write_to(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj, **dump_options) -> None:
  """`obj` as indented JSON (one trailing newline), replacing `path` atomically."""
  def write_to(f):
    json.dump(obj, f, indent=1, **dump_options)
    f.write("\n")
  write(path, write_to)
