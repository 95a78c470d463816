"""Training checkpoints: model, optimizer and Grain iterator saved together with Orbax.

Saves are asynchronous (arrays are copied off device, then written in the background)
and atomic (Orbax finalises a step's folder only once it is complete), and the last
`keep` steps are kept. Restoring takes the shardings of the *current* mesh, so a run can
resume on a different number of devices.

When things go wrong:
- A write that fails (disk full, folder replaced, network filesystem error) is a
  `WriteError` naming the step and the cause. Orbax's background threads may then wait for
  each other forever, and Python's normal exit would wait for them: the trainer ends the
  process at once (`cli.fail(..., at_once=True)`). Step folders are created in the
  foreground so that a missing or replaced folder fails right there, not in a thread.
- A step that cannot be read back (a truncated array file, damaged metadata) is moved
  aside to `<directory>_unreadable/STEP` (kept for a look, and out of the way of the step's
  new save) with one line saying why, and the step before is tried.
- Checkpoints of another model (other architecture or parameter shapes) are a
  `MismatchError` in one line, not a corruption: no step is skipped.
"""
import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from negjax import cli

log = logging.getLogger("negjax.train")


class WriteError(cli.UserError):
  """A checkpoint could not be written."""


class MismatchError(cli.UserError):
  """The saved checkpoints are of another model than the one being trained."""


class UnreadableError(cli.UserError):
  """Every saved step failed to read back."""


class Checkpointer:
  """One run's checkpoints under `directory`: {state: pytree, data: Grain iterator}."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.in_flight = None  # the step being written in the background, if any
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # a save cut short by a crash is never read
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    self.wait()  # Orbax waits for the previous write anyway; this way its failure is its own
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)
    except Exception as e:
      raise self._write_error(step, e) from e
    self.in_flight = step

  def wait(self) -> None:
    """Blocks until the background write is done; `WriteError` if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(self.in_flight, e) from e
    self.in_flight = None

  def close(self) -> None:
    self.wait()
    self.manager.close()

  def _write_error(self, step, e) -> WriteError:
    return WriteError(f"could not write checkpoint step {step} to {self.directory}: "
                      f"{one_line(e)}")

  # ------------------------------------------------------------------ restore

  def restore(self, step: int, state_template, shardings, data_iterator):
    """Restores `state` laid out by `shardings` and rewinds `data_iterator` in place."""
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state_template, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def restore_latest(self, state_template, shardings, data_iterator):
    """(step, state) of the newest step that reads back intact, or (None, None) when there
    is no checkpoint. An unreadable step is moved aside with one line saying why; when no
    step reads back, `UnreadableError`, never a silent fresh start."""
    skipped = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        saved = _shapes(self.manager.item_metadata(step)["state"])
      except Exception as e:
        saved, problem = None, e
      if saved is not None:
        self._check_same_model(step, saved, _shapes(state_template))
        try:
          state, problem = self.restore(step, state_template, shardings, data_iterator), None
        except Exception as e:
          problem = e
      if _everywhere_ok(problem is None):
        return step, state
      reason = one_line(_innermost(problem)) if problem else "unreadable on another process"
      aside = self._move_aside(step)
      log.warning("checkpoint step %d is unreadable, moved to %s (%s); trying the step "
                  "before", step, aside, reason)
      skipped.append(step)
    if skipped:
      raise UnreadableError(f"no checkpoint in {self.directory} reads back (steps {skipped} "
                            f"moved to {self.directory}_unreadable); rerun to start afresh")
    return None, None

  def _check_same_model(self, step, saved: dict, current: dict) -> None:
    if saved == current:
      return
    reshaped = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
    if reshaped:
      k = reshaped[0]
      detail = f"{k} has shape {saved[k]} there, {current[k]} here"
    else:
      there, here = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
      detail = (f"{len(there)} arrays only there (e.g. {there[:1]}), {len(here)} only "
                f"here (e.g. {here[:1]})")
    raise MismatchError(
        f"the checkpoints in {self.directory} (step {step}) are of another model: {detail}; "
        f"resume with that run's model.arch/model.init, or use another workdir")

  def _move_aside(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(f"{self.directory}_unreadable", str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      if os.path.exists(dst):  # from an earlier rerun that failed on the same step
        dst = f"{dst}.{len(os.listdir(os.path.dirname(dst)))}"
      os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"negjax: checkpoint {step} moved aside")
    self.manager.reload()
    return dst


def one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 300 else text[:297] + "..."


def _innermost(e: BaseException) -> BaseException:
  """The root cause (Orbax wraps TensorStore's precise message in general ones)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  return e


def _shapes(tree) -> dict:
  """{"params/visual/...": shape} of a pytree of arrays or Orbax array metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out["/".join(_key_name(k) for k in path)] = tuple(int(d) for d in leaf.shape)
  return out


def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _everywhere_ok(ok: bool) -> bool:
  """True when `ok` holds on every process (all processes must agree which step to use)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))
