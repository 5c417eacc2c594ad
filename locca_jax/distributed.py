"""Multi-process start-up: `jax.distributed.initialize`, before anything touches a JAX device.

Every host (or every GPU, under SLURM) runs the same `python -m locca_jax.train ...`; this
module makes those processes one JAX job. Which processes form the job, in order of precedence:

1. Explicit: coordinator address, process count and this process's id from the arguments
   (train.py's `--coordinator_address`, `--num_processes`, `--process_id`), else from the
   environment (`LOCCA_COORDINATOR_ADDRESS`, `LOCCA_NUM_PROCESSES`, `LOCCA_PROCESS_ID`).
   E.g. two processes on one machine: `LOCCA_COORDINATOR_ADDRESS=localhost:12355
   LOCCA_NUM_PROCESSES=2 LOCCA_PROCESS_ID=0|1`.
2. A cluster that JAX recognizes itself, through `jax.distributed.initialize()` without
   arguments: a SLURM job step (`srun`) with more than one task (JAX reads `SLURM_*`: one
   process per task; task i of a node uses its GPU i, or the one GPU SLURM bound to it), or
   a Cloud TPU VM (JAX asks the TPU metadata server for the workers of the pod slice).
   `LOCCA_DISTRIBUTED=auto` forces this path for any cluster JAX knows (TPU, SLURM, Open MPI,
   ...); `LOCCA_DISTRIBUTED=off` disables initialization altogether.
3. Otherwise a single process: nothing to initialize.

On CPU, cross-process collectives go through gloo (`jax_cpu_collectives_implementation`).
Processes other than 0 log warnings and errors only (progress lines, restore messages: once,
from process 0); `metrics.jsonl` / TensorBoard are written by process 0 (see metrics.py).
"""
import importlib.util
import os
from typing import Mapping, NamedTuple

from absl import logging
import jax

ENV_COORDINATOR_ADDRESS = "LOCCA_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "LOCCA_NUM_PROCESSES"
ENV_PROCESS_ID = "LOCCA_PROCESS_ID"
ENV_MODE = "LOCCA_DISTRIBUTED"  # "auto" | "off" | unset (decide as in the module docstring)

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


class Plan(NamedTuple):
  """How this process joins the job. mode: "single" | "explicit" | "cluster"."""
  mode: str
  why: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None  # None: JAX decides


def _int_or_none(value, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r}: expected an integer") from None


def _on_cloud_tpu_vm(environ: Mapping[str, str]) -> bool:
  """libtpu installed and TPU chips attached (v2-v4: /dev/accel*, v5+: /dev/vfio), or GKE."""
  if "TPU_WORKER_HOSTNAMES" in environ or "TPU_PROCESS_ADDRESSES" in environ:
    return True
  if importlib.util.find_spec("libtpu") is None:
    return False
  return os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio")


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, *,
         environ: Mapping[str, str] | None = None) -> Plan:
  """Decides how to initialize; no side effects (reads the arguments, `environ`, /dev)."""
  environ = os.environ if environ is None else environ
  address = coordinator_address or environ.get(ENV_COORDINATOR_ADDRESS) or None
  count = num_processes if num_processes is not None else _int_or_none(
      environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _int_or_none(
      environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
  mode = environ.get(ENV_MODE, "").strip().lower()
  if mode not in ("", "auto", "off"):
    raise ValueError(f"{ENV_MODE}={environ[ENV_MODE]!r}: expected 'auto', 'off' or unset")

  if mode == "off":
    return Plan("single", f"{ENV_MODE}=off")
  if (address, count, index) != (None, None, None):
    given = dict(coordinator_address=address, num_processes=count, process_id=index)
    missing = [k for k, v in given.items() if v is None]
    if count == 1 and index in (None, 0):
      return Plan("single", "num_processes=1")
    if missing:
      raise ValueError(
          f"Multi-process training needs coordinator_address, num_processes and process_id "
          f"together (flags --coordinator_address, --num_processes, --process_id, or "
          f"environment {ENV_COORDINATOR_ADDRESS}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
          f"got {given}, missing {missing}")
    if count < 1 or not 0 <= index < count:
      raise ValueError(f"process_id={index} must be in [0, num_processes={count})")
    if ":" not in address:
      raise ValueError(f"coordinator_address={address!r}: expected host:port of process 0, "
                       "e.g. 10.0.0.2:12355")
    return Plan("explicit", "coordinator address / process count / id given", address,
                count, index)
  if mode == "auto":
    return Plan("cluster", f"{ENV_MODE}=auto")
  if all(v in environ for v in _SLURM_VARS):
    tasks = _int_or_none(environ["SLURM_NTASKS"], "SLURM_NTASKS")
    if tasks > 1:
      # JAX gives task i of a node GPU i; when SLURM already bound one GPU to each task
      # (--gpus-per-task=1, --gpu-bind), that GPU is the task's device 0.
      visible = environ.get("CUDA_VISIBLE_DEVICES", "")
      bound = (0,) if visible and len(visible.split(",")) == 1 else None
      return Plan("cluster", f"SLURM step with {tasks} tasks", local_device_ids=bound)
    return Plan("single", "SLURM step with 1 task")
  if _on_cloud_tpu_vm(environ):
    return Plan("cluster", "Cloud TPU VM")
  return Plan("single", "no coordinator given and no cluster detected")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, quiet_other_processes: bool = True) -> Plan:
  """Joins this process to the multi-process JAX job (or does nothing for a single process).

  Call it once, first thing in `main`, before any JAX computation or `jax.devices()`.
  Returns the plan it followed; logs process index / count and local / global devices.
  """
  p = plan(coordinator_address, num_processes, process_id)
  if p.mode != "single":
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
      # Cross-process collectives on CPU devices (tests, CPU clusters); other backends ignore it.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if p.mode == "explicit":
      logging.info("jax.distributed: process %d of %d, coordinator %s", p.process_id,
                   p.num_processes, p.coordinator_address)
      jax.distributed.initialize(p.coordinator_address, p.num_processes, p.process_id)
    else:
      logging.info("jax.distributed: %s, letting JAX detect the cluster", p.why)
      jax.distributed.initialize(local_device_ids=p.local_device_ids)
  local, everywhere = jax.local_devices(), jax.devices()
  logging.info("Process %d of %d (%s): %d local devices %s, %d global devices (%s)",
               jax.process_index(), jax.process_count(), p.why, len(local),
               [d.id for d in local], len(everywhere), everywhere[0].platform)
  if quiet_other_processes and jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  return p
