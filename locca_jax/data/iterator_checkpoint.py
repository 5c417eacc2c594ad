"""Orbax handler that saves / restores a tf.data iterator's position, one file set per process.

Use it as one item of an orbax `CheckpointManager`:

  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=IteratorSave(train_iter)))
  mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=IteratorRestore(train_iter)))

The iterator is either an `input_pipeline.InputIterator` (its own `process_index` /
`process_count` name the files) or a bare `tf.data` iterator (then `jax.process_index()` /
`jax.process_count()` do). Every process writes `process_{i}_of_{n}.{index,data-*}` into the
item directory with `tf.train.Checkpoint(iterator=...)`. Saving is synchronous (a plain
`CheckpointHandler`), so the state saved is the one at the moment `save` is called, even when
the rest of the checkpoint is written asynchronously. Restoring with a different process
count is an error: the data each process reads would no longer line up.
"""
import dataclasses
from typing import Any, Optional

from etils import epath
import jax
import orbax.checkpoint as ocp
import tensorflow as tf


def _process_of(iterator):
  """(tf iterator, process_index, process_count) for an InputIterator or a tf iterator."""
  tf_iterator = getattr(iterator, "tf_iterator", iterator)
  index = getattr(iterator, "process_index", None)
  count = getattr(iterator, "process_count", None)
  if index is None or count is None:
    index, count = jax.process_index(), jax.process_count()
  return tf_iterator, index, count


def process_prefix(process_index, process_count):
  return f"process_{process_index}_of_{process_count}"


class IteratorCheckpointHandler(ocp.CheckpointHandler):
  """Saves the tf.data iterator state of this process into the checkpoint item directory."""

  def save(self, directory: epath.Path, args: "IteratorSave"):
    tf_iterator, index, count = _process_of(args.iterator)
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tf.train.Checkpoint(iterator=tf_iterator).write(
        str(directory / process_prefix(index, count)))

  def restore(self, directory: epath.Path, args: Optional["IteratorRestore"] = None) -> Any:
    if args is None or args.iterator is None:
      raise ValueError(
          f"{directory}: restoring an input iterator needs the iterator to restore into "
          "(pass IteratorRestore(iterator) built from the same config).")
    tf_iterator, index, count = _process_of(args.iterator)
    directory = epath.Path(directory)
    prefix = directory / process_prefix(index, count)
    if not (directory / (prefix.name + ".index")).exists():
      found = sorted(p.name for p in directory.glob("process_*.index")) if directory.exists() else []
      raise FileNotFoundError(
          f"{prefix}.index: no saved input iterator for process {index} of {count} "
          f"(found {found or 'nothing'}; the process count must match the saving run's).")
    tf.train.Checkpoint(iterator=tf_iterator).read(str(prefix)).assert_consumed()
    return args.iterator

  def metadata(self, directory: epath.Path) -> Optional[Any]:
    directory = epath.Path(directory)
    if not directory.exists():
      return None
    return dict(files=sorted(p.name for p in directory.glob("process_*.index")))


@ocp.args.register_with_handler(IteratorCheckpointHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  """`iterator`: an `input_pipeline.InputIterator` or a tf.data iterator."""
  iterator: Any


@ocp.args.register_with_handler(IteratorCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  """`iterator`: a freshly built iterator (same config) whose state is restored in place."""
  iterator: Any = None
