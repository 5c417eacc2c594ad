"""The study: every stage of every arm x seed, resumably, then the report.

See the package docstring (`locca_jax/study/__init__.py`) for what runs and why.
"""
import os
import shlex
import sys
import time

from absl import logging

from locca_jax.data import locca_shapes
from locca_jax.study import arms as arms_lib
from locca_jax.study import report
from locca_jax.study import stages

DEFAULT_ROOT = "workdirs/study"


def _parse_seeds(seeds) -> list[int]:
  out = []
  for s in seeds:
    try:
      out.append(int(s))
    except ValueError:
      raise ValueError(f"--seeds: {s!r} is not an integer (expected e.g. --seeds=0,1,2)") from None
  if not out or len(set(out)) != len(out):
    raise ValueError(f"--seeds={seeds}: expected distinct integers")
  return out


def _parse_arms(arms) -> list[str]:
  arms = list(arms) if arms else list(arms_lib.ARMS)
  unknown = [a for a in arms if a not in arms_lib.ARMS]
  if unknown or len(set(arms)) != len(arms):
    raise ValueError(f"--arms={','.join(arms)}: expected distinct names of "
                     f"{list(arms_lib.ARMS)}")
  return arms


def run_study(*, out: str, root: str = DEFAULT_ROOT, seeds=(0, 1, 2), scale: str = "default",
              arms=None, data_dir: str | None = None, command: str | None = None,
              dataset: str | None = None, keep_recorded: bool = True) -> dict:
  """Runs (or resumes) every stage of every arm x seed, then writes the report.

  Seed by seed (every arm at the first seed, then the next seed), and the report is rewritten
  after each arm x seed: an interrupted long study leaves a report of the runs it finished,
  marked partial, with every arm compared on the same seeds so far. `dataset` (a
  locca_shapes config) replaces the scale's. `keep_recorded`: keep the arm x seeds recorded
  in `out`'s .json with the same configs (see report.recorded_runs) instead of running them.
  Returns {"runs": [{arm, seed, stage, status}], "report": out, "json": its .json}.
  """
  seeds, arms = _parse_seeds(seeds), _parse_arms(arms)
  sc = arms_lib.with_dataset(arms_lib.parse_scale(str(scale)), dataset)
  root = os.path.abspath(root)
  if command is None:
    command = shlex.join(["python", "-m", "locca_jax.study", *sys.argv[1:]])
  started, machine = time.monotonic(), report.machine_info()
  locca_shapes.prepare(sc.dataset, data_dir)  # generated once, on first use
  json_path = report.record_path(out)
  carried = (report.recorded_runs(json_path, root, arms, seeds, sc, data_dir) if keep_recorded
             else {arm: {} for arm in arms})
  statuses = []

  def write():  # the report of every run finished so far, and its .json
    return report.write_report(out, root=root, arms=arms, seeds=seeds, sc=sc,
                               data_dir=data_dir, command=command,
                               wall=time.monotonic() - started, statuses=statuses,
                               machine=machine, carried=carried)

  for seed in seeds:
    for arm in arms:
      dirs = arms_lib.run_workdirs(root, arm, seed)
      if str(seed) in carried[arm] and not stages.finished(
          arms_lib.stage_configs(arm, sc, seed, root, data_dir), dirs):
        logging.info("study: %s seed %d: kept as recorded in %s", arm, seed, json_path)
        statuses += [dict(arm=arm, seed=seed, stage=stage, status="recorded")
                     for stage in ("pretrain", "probe", "transfer")]
        continue
      cfg = arms_lib.pretrain_config(arm, sc, seed, data_dir)
      logging.info("study: %s seed %d: pretraining in %s", arm, seed, dirs["pretrain"])
      statuses.append(dict(arm=arm, seed=seed, stage="pretrain",
                           status=stages.ensure_trained(cfg, dirs["pretrain"], "pretrain")))
      statuses.append(dict(arm=arm, seed=seed, stage="probe",
                           status=stages.ensure_probe(cfg, dirs["pretrain"],
                                                      arms_lib.probe_eval(sc))))
      tcfg = arms_lib.transfer_config(sc, seed, dirs["pretrain"], data_dir)
      logging.info("study: %s seed %d: frozen-encoder transfer in %s", arm, seed,
                   dirs["transfer"])
      statuses.append(dict(arm=arm, seed=seed, stage="transfer",
                           status=stages.ensure_trained(tcfg, dirs["transfer"], "transfer")))
      write()
  json_path = write()
  logging.info("study: wrote %s and %s (%.0fs)", out, json_path, time.monotonic() - started)
  return dict(runs=statuses, report=out, json=json_path)
