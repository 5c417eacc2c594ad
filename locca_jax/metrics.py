"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard, and progress lines. Process 0 writes.

`metrics.jsonl` holds one JSON object per logged step: `step`, `train/loss`,
`train/loss_<task>`, `lr`, `img_per_sec`, ... (appended, so a resumed run continues the file).
"""
import json
import math
import os
import time
from typing import Mapping

from absl import logging
from etils import epath


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class MetricsWriter:
  """Writes scalar metrics; measures images/s and ETA between calls to `write`."""

  def __init__(self, workdir: str, *, total_steps: int, batch_size: int, is_main: bool,
               tensorboard: bool = True):
    self._total_steps = total_steps
    self._batch_size = batch_size
    self._is_main = is_main
    self._last = None  # (step, time) of the previous write
    self._jsonl = None
    self._summary = None
    if is_main:
      # epath: local paths and gs:// buckets alike (TPU pods write to a bucket).
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      self._jsonl = (epath.Path(workdir) / "metrics.jsonl").open("a")  # pylint: disable=consider-using-with
      if tensorboard:
        from clu import metric_writers  # pylint: disable=g-import-not-at-top
        self._summary = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def start(self, step: int):
    """Marks the step from which throughput is measured (after restore / compile)."""
    self._last = (step, time.monotonic())

  def write(self, step: int, metrics: Mapping[str, float]):
    now = time.monotonic()
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in metrics.items()})
    eta = ""
    if self._last is not None and step > self._last[0]:
      secs_per_step = (now - self._last[1]) / (step - self._last[0])
      record["img_per_sec"] = self._batch_size / secs_per_step
      eta = _format_duration(secs_per_step * (self._total_steps - step))
    self._last = (step, now)
    loss = record.get("train/loss", math.nan)
    logging.info("step %d/%d | loss %.4f | %s img/s | ETA %s", step, self._total_steps, loss,
                 f"{record['img_per_sec']:.1f}" if "img_per_sec" in record else "-",
                 eta or "-")
    self._emit(record)

  def write_eval(self, step: int, metrics: Mapping[str, float]):
    """Evaluator results; the time spent evaluating is kept out of the next img/s."""
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in metrics.items()})
    logging.info("step %d eval: %s", step, json.dumps(record))
    self._emit(record)
    self._last = (step, time.monotonic())

  def _emit(self, record):
    if not self._is_main:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._summary is not None:
      self._summary.write_scalars(record["step"],
                                  {k: v for k, v in record.items() if k != "step"})
      self._summary.flush()

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._summary is not None:
      self._summary.close()
