"""One training run per workdir at a time: WORKDIR/.lock, held for the life of the process.

An OS lock (`flock`), not a marker file: the kernel releases it when the process ends in
any way, kill -9 included, so a killed run never blocks its rerun. In a multi-host run
process 0 takes the lock for the whole run and tells the others whether it got it, so
every process of a second run stops with the same one-line error. On a filesystem that
cannot lock (some network mounts) the run goes on with a warning.
"""
import fcntl
import logging
import os
import socket

import jax

from negjax import cli, sharding

log = logging.getLogger("negjax.train")
_held = []  # open lock files: closing one would release its lock


def lock(workdir: str) -> None:
  """Takes WORKDIR/.lock or raises `cli.UserError` naming the run that holds it."""
  path = os.path.join(workdir, ".lock")
  ok, holder = True, "another process"
  if jax.process_index() == 0:
    f = open(path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      ok = False
      f.seek(0)
      holder = f.read().strip() or holder
      f.close()
    except OSError as e:  # no locking on this filesystem
      log.warning("cannot lock %s (%s): a second run into this workdir would not be stopped",
                  path, e)
      f.close()
    else:
      f.seek(0)
      f.truncate()
      f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
      f.flush()
      _held.append(f)
  if not sharding.process_0_says(ok):
    raise cli.UserError(f"{workdir} is in use by another training run ({holder}); wait for "
                        f"it to end, or use another --config.workdir")
