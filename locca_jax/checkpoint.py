"""Orbax checkpoints of the train state (and, as a second item, the input position).

Layout: WORKDIR/checkpoints/<step>/{state,data}/. `state` (params, optimizer state, step, RNG)
is written asynchronously by all processes cooperatively; `data` holds each process's
tf.data iterator position (see `locca_jax.data.iterator_checkpoint`, which registers its
args with orbax; this module needs no TensorFlow itself).
"""
import os
import re
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every` steps (and when forced), keeps the newest `keep`, restores the latest."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = directory if "://" in directory else os.path.abspath(directory)  # gs://
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

  def reached_preemption(self, step: int) -> bool:
    """True once JAX has seen a preemption notice (SIGTERM) and all hosts agreed on `step`."""
    return self._manager.reached_preemption(step)

  def wait(self):
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def load_params(directory: str, step: int | None = None) -> tuple[int, Any]:
  """Params of another run's checkpoint (latest, or `step`) as host numpy arrays.

  Independent of the mesh and model that wrote it, so a different model (e.g. a fresh decoder
  on a pretrained encoder) can take what it needs.
  """
  directory = os.path.abspath(directory)
  if step is None:
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(
        directory) else []
    if not steps:
      raise FileNotFoundError(f"{directory}: no checkpoint steps (expected <step>/state "
                              "written by locca_jax.train)")
    step = max(steps)
  path = os.path.join(directory, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                        tree["params"])
  state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item={"params": tree["params"]}, restore_args={"params": restore_args},
      partial_restore=True))
  return step, state["params"]


def _path(key_path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in key_path)


def replace_params(params: Any, pretrained: Any, pattern: str, source: str) -> Any:
  """`params` with every leaf whose "/"-joined path fully matches `pattern` taken from
  `pretrained` (same path, same shape), placed with that leaf's sharding."""
  pretrained = {_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(pretrained)[0]}
  replaced = []

  def one(key_path, leaf):
    path = _path(key_path)
    if not re.fullmatch(pattern, path):
      return leaf
    if path not in pretrained:
      raise ValueError(f"{source}: has no parameter {path} (config.init_from.params="
                       f"{pattern!r} selects it)")
    value = pretrained[path]
    if value.shape != leaf.shape:
      raise ValueError(f"{source}: {path} has shape {value.shape}, the model expects "
                       f"{leaf.shape}")
    replaced.append(path)
    return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

  params = jax.tree_util.tree_map_with_path(one, params)
  if not replaced:
    raise ValueError(f"config.init_from.params={pattern!r} matches no parameter")
  logging.info("Initialized %d parameters from %s", len(replaced), source)
  return params
