r"""Trains any config of this project: LocCa, Cap, CapPa (one trainer).

  python -m locca_jax.train --config=configs/locca_b16.py:runlocal --workdir=workdirs/locca

Rerunning the same command on the same workdir resumes from the latest checkpoint and
continues the identical sequence of batches.
"""
import collections
import logging as std_logging
import math
import os

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections
from ml_collections import config_flags

from locca_jax import checkpoint
from locca_jax import distributed
from locca_jax import evaluate
from locca_jax import metrics as metrics_lib
from locca_jax import sharding
from locca_jax import train_step
from locca_jax.data import input_pipeline
from locca_jax.data import iterator_checkpoint
from locca_jax.models import locca

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard.")
# Multi-process without a cluster JAX detects (SLURM, Cloud TPU): see locca_jax/distributed.py.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, in [0, num_processes).")


class StepsInFlight:
  """Bounds how many dispatched train steps may still be running on the device.

  JAX dispatches steps asynchronously, so between two logging steps the loop would otherwise
  run ahead without bound, each queued step holding its batch (and its outputs) in device
  memory. `push(x)` after dispatching a step records a small output of it and waits until the
  step `limit` pushes back is done: the device always has the next `limit` steps queued (no
  idle gap), while the host reads and transfers the next batch during the device's compute.
  The input iterator advances exactly once per dispatched step, so checkpoints (and resume)
  are unchanged. `limit` 0: wait for every step (synchronous).
  """

  def __init__(self, limit: int):
    if limit < 0:
      raise ValueError(f"config.steps_in_flight={limit}: expected >= 0")
    self.limit = limit
    self._queue = collections.deque()

  def push(self, value):
    self._queue.append(value)
    while len(self._queue) > self.limit:
      jax.block_until_ready(self._queue.popleft())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       steps_this_run: int | None = None) -> train_step.State:
  """Trains to `config.total_steps`, resuming from WORKDIR/checkpoints if present.

  `steps_this_run` stops (after checkpointing) once this process has run that many steps,
  e.g. to fit a scheduler's time limit; the next run resumes where it stopped.
  """
  mesh = sharding.make_mesh(config.mesh)
  logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape),
               jax.device_count(), jax.process_count())
  tokenizer = input_pipeline.make_tokenizer(config.input.tokenizer)
  model = locca.make_model(config.model, tokenizer.vocab_size, config.input.seq_len)
  spec = train_step.make_state_spec(model, config, mesh)
  train_iter = input_pipeline.make_train_iterator(config, tokenizer)
  evaluate.check_evals(config, tokenizer, mesh)  # a bad eval config fails now, not hours in
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 every=config.ckpt_every, keep=config.keep_ckpts)

  if jax.process_index() == 0:  # what predict.py / the notebook rebuild the model from
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local or gs://
    (epath.Path(workdir) / "config.json").write_text(config.to_json())
  start = ckpt.latest_step()
  if start is None:
    start, state = 0, spec.init()
    if config.get("init_from"):
      state["params"] = _init_from_pretrained(state["params"], config.init_from)
  else:
    state = ckpt.restore(start, spec.abstract, iterator_checkpoint.IteratorRestore(train_iter))
  num_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state["params"]))
  logging.info("Model: %.2fM parameters; starting at step %d of %d", num_params / 1e6, start,
               config.total_steps)

  step_fn = train_step.make_train_step(model, spec.tx, config, mesh, spec.shardings)
  writer = metrics_lib.MetricsWriter(workdir, total_steps=config.total_steps,
                                     batch_size=config.input.batch_size,
                                     is_main=jax.process_index() == 0)
  end = config.total_steps
  if steps_this_run is not None:
    end = min(end, start + steps_this_run)
  # A failure (an evaluator, a NaN, Ctrl-C) still lets the checkpoint being written finish, so
  # the rerun resumes from it instead of from the one before.
  in_flight = StepsInFlight(int(config.get("steps_in_flight", 2)))
  try:
    for step in range(start + 1, end + 1):
      batch = sharding.global_batch(next(train_iter), mesh)
      state, metrics = step_fn(state, batch)
      in_flight.push(metrics["train/loss"])
      if step == start + 1:  # throughput excludes compilation
        jax.block_until_ready(metrics)
        writer.start(step)
      if step % config.log_every == 0 or step == end:
        metrics = jax.device_get(metrics)  # the only host sync: on logging steps
        metrics["lr"] = config.lr * float(spec.schedule_fn(step - 1))
        metrics.update(train_iter.data_metrics(all_processes=True))  # skipped records by reason
        if not math.isfinite(metrics["train/loss"]):
          raise FloatingPointError(f"step {step}: train/loss is {metrics['train/loss']}")
        writer.write(step, metrics)
      preempted = ckpt.reached_preemption(step)
      ckpt.save(step, state, iterator_checkpoint.IteratorSave(train_iter),
                force=step == end or preempted)
      if preempted:
        logging.warning("Preempted at step %d: checkpoint saved, stopping", step)
        break
      eval_names = evaluate.evals_due(config, step, config.total_steps)
      if eval_names:
        writer.write_eval(step, evaluate.run_evals(config, state["params"], model, tokenizer,
                                                   mesh, step, workdir, names=eval_names))
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  return state


def _init_from_pretrained(params, init_from: ml_collections.ConfigDict):
  """Loads `init_from.params` (a regex, e.g. "img/.*": the encoder) from another workdir."""
  source = os.path.join(init_from.workdir, "checkpoints")
  step, pretrained = checkpoint.load_params(source, init_from.get("step"))
  return checkpoint.replace_params(params, pretrained, init_from.params,
                                   f"{source}/{step}")


def _quiet_library_info(record) -> bool:
  """Keeps orbax's per-save INFO chatter out of the progress log (warnings still show)."""
  return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_library_info)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  # TensorFlow only feeds the input pipeline: keep it off the accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
