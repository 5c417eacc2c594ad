"""Orbax checkpoints of the train state (and, as a second item, the input position).

Layout: WORKDIR/checkpoints/<step>/{state,data}/. `state` (params, optimizer state, step, RNG)
is written asynchronously by all processes cooperatively; `data` holds each process's
tf.data iterator position (see `locca_jax.data.iterator_checkpoint`, which registers its
args with orbax; this module needs no TensorFlow itself).
"""
import os
from typing import Any

from absl import logging
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every` steps (and when forced), keeps the newest `keep`, restores the latest."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep,
            enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_args: ocp.args.CheckpointArgs | None = None,
           *, force: bool = False) -> bool:
    """Starts saving `state` (async) if `step` is due or `force`; returns whether it did."""
    items = dict(state=ocp.args.StandardSave(state))
    if data_args is not None:
      items["data"] = data_args
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Saving checkpoint %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any,
              data_args: ocp.args.CheckpointArgs | None = None) -> Any:
    """Restores into `abstract_state` (ShapeDtypeStructs carrying the target shardings)."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_args is not None:
      items["data"] = data_args
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored checkpoint %d from %s", step, self.directory)
    return restored["state"]

  def wait(self):
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
