"""Running one stage of the study, resumably, and reading back what it logged.

A stage is a training run through the one trainer (`train.train_and_evaluate`) or the linear
probe on a finished run's checkpoint. A stage whose final checkpoint and final-step results
exist is skipped; one interrupted mid-training resumes from its last checkpoint (the trainer's
own resume); one whose final checkpoint exists but whose results are missing is evaluated
from that checkpoint. A workdir made with another config is an error, not a reuse.
"""
import datetime
import json
import os
import time

from absl import logging
import jax
import ml_collections

from locca_jax import evaluate
from locca_jax import metrics as metrics_lib
from locca_jax import sharding
from locca_jax import train
from locca_jax.data import input_pipeline
from locca_jax.evaluators import common
from locca_jax.evaluators import probe
from locca_jax.models import locca
from locca_jax.study import overrides


def final_step_metrics(workdir: str, step: int) -> dict:
  """Every value logged at `step` in WORKDIR/metrics.jsonl, later records winning (a resumed
  run re-logs the steps it redoes). {} if there is no such file."""
  path = os.path.join(workdir, "metrics.jsonl")
  out = {}
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {n}: not JSON ({e}); expected one object per line as "
                         "locca_jax.metrics writes") from None
      if record.get("step") == step:
        out.update(record)
  return out


def _has_final_checkpoint(workdir: str, step: int) -> bool:
  return os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def missing_results(config, workdir: str, extra=()) -> list[str]:
  """Names of config.evals (and `extra`) without results at the last step in metrics.jsonl."""
  logged = final_step_metrics(workdir, config.total_steps)
  names = list(config.evals.keys()) + list(extra)
  return [n for n in names if not any(k.startswith(n + "/") for k in logged)]


def _check_same_config(config, workdir: str):
  """A workdir made with another config must not be resumed or reported as this one."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    existing = json.load(f)
  changed, removed = overrides.config_diff(existing, json.loads(config.to_json()))
  if changed or removed:
    before = overrides.flatten(existing)
    fields = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in sorted(changed.items())]
    fields += [f"{k}: removed" for k in removed]
    raise ValueError(f"{path}: this workdir was made with another config than the study would "
                     f"run now ({'; '.join(fields[:6])}); use another --workdir or delete "
                     f"{workdir}")


def _timing_path(workdir: str) -> str:
  return os.path.join(workdir, "study_timing.json")


def read_timing(workdir: str) -> dict:
  """{stage: {wall_s, resumed_from_step, finished}} of WORKDIR/study_timing.json ({}: none)."""
  path = _timing_path(workdir)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_timing(workdir: str, stage: str, wall_s: float, resumed_from: int | None):
  """Adds this invocation's seconds on `stage` to WORKDIR/study_timing.json (an invocation
  killed mid-stage records nothing: its time is lost, its checkpoints are not)."""
  timing = read_timing(workdir)
  wall_s += timing.get(stage, {}).get("wall_s", 0.0)
  timing[stage] = dict(wall_s=wall_s, resumed_from_step=resumed_from,
                       finished=datetime.datetime.now().isoformat(timespec="seconds"))
  with open(_timing_path(workdir), "w") as f:
    json.dump(timing, f, indent=1)


def _latest_checkpoint(workdir: str) -> int | None:
  directory = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(
      directory) else []
  return max(steps) if steps else None


def _append_evals(config, workdir: str, step: int, results: dict):
  """Appends evaluator results at `step` to metrics.jsonl (and TensorBoard), as the trainer."""
  writer = metrics_lib.MetricsWriter(workdir, total_steps=config.total_steps,
                                     batch_size=config.input.batch_size,
                                     is_main=jax.process_index() == 0)
  try:
    writer.write_eval(step, results)
  finally:
    writer.close()


def ensure_trained(config, workdir: str, stage: str) -> str:
  """Trains (or resumes) to the last step and makes sure its evaluations are logged.

  Returns "skipped" (already complete), "evaluated" (final checkpoint there, evaluations
  run now) or "trained".
  """
  _check_same_config(config, workdir)
  step = config.total_steps
  done = _has_final_checkpoint(workdir, step)
  missing = missing_results(config, workdir)
  if done and not missing:
    return "skipped"
  start = time.monotonic()
  resumed_from = _latest_checkpoint(workdir)
  status = "evaluated"
  if not done:
    train.train_and_evaluate(config, workdir)
    status = "trained"
    if not _has_final_checkpoint(workdir, step):
      raise RuntimeError(f"{workdir}: training stopped before step {step} (preempted?); rerun "
                         "the study to resume it")
    missing = missing_results(config, workdir)
  if missing:  # e.g. the process died during the last step's evaluations
    results = evaluate.evaluate_checkpoint(config, workdir, step=step, names=missing)
    _append_evals(config, workdir, step, {k: v for k, v in results.items() if k != "step"})
  _write_timing(workdir, stage, time.monotonic() - start, resumed_from)
  return status


def ensure_probe(config, workdir: str, probe_cfg: dict) -> str:
  """Runs the linear probe on the final checkpoint of `workdir` unless its results exist."""
  step = config.total_steps
  if not missing_results(config, workdir, extra=["probe"]):
    return "skipped"
  start = time.monotonic()
  mesh = sharding.make_mesh(config.mesh)
  tokenizer = input_pipeline.make_tokenizer(config.input.tokenizer)
  model = locca.make_model(config.model, tokenizer.vocab_size, config.input.seq_len)
  _, params = evaluate.restore_params(config, model, mesh, workdir, step)
  ctx = common.Context(config=config, model=model, params=params, tokenizer=tokenizer,
                       mesh=mesh)
  cfg = ml_collections.ConfigDict(probe_cfg)
  results, records = probe.evaluate(ctx, "probe", cfg)
  logging.info("probe of %s: %s", workdir, results)
  evaluate.write_predictions(workdir, "probe", step, records)
  _append_evals(config, workdir, step, {f"probe/{k}": v for k, v in results.items()})
  _write_timing(workdir, "probe", time.monotonic() - start, None)
  return "probed"


def finished(configs: dict, dirs: dict) -> bool:
  """Whether every stage ({stage: config}, {stage: workdir}: arms.stage_configs,
  arms.run_workdirs) logged all its final evaluations, the probe's included."""
  extra = dict(pretrain=["probe"], transfer=[])
  return not any(missing_results(configs[st], dirs[st], extra[st]) for st in dirs)
