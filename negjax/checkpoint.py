"""Training checkpoints: model, optimizer and Grain iterator saved together with Orbax.

Saves are asynchronous (arrays are copied off device, then written in the background)
and atomic (Orbax finalises a step's folder only once it is complete), and the last
`keep` steps are kept. Restoring takes the shardings of the *current* mesh, so a run can
resume on a different number of devices.
"""
import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """One run's checkpoints under `directory`: {state: pytree, data: Grain iterator}."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)  # a save cut short by a crash is never read
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

  def restore(self, step: int, state_template, shardings, data_iterator):
    """Restores `state` laid out by `shardings` and rewinds `data_iterator` in place."""
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state_template, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
