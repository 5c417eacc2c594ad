r"""The LocCa paper's encoder comparison in miniature, on `locca_shapes`, by one command.

  python -m locca_jax.study --out=docs/RESULTS.md                   # default scale, 3 seeds
  python -m locca_jax.study --out=/tmp/R.md --scale=tiny --seeds=0 --arms=cap,locca
  python -m locca_jax.study --out=docs/RESULTS.md --scale=full       # where LocCa's effect shows

For each arm (a named, pure transformation of configs/locca_b16.py:runlocal, see ARMS) and each
seed, the study runs, each stage in its own workdir under `--workdir` (default workdirs/study;
the trainer's flag, reused), every stage through the one trainer
(`train.train_and_evaluate`) and the evaluators of `locca_jax.evaluate`:

  1. pretrain   WORKDIR/<arm>/seed<k>/pretrain: the arm's pretraining; at its last step the
                trainer evaluates, on the held-out TEST split, captioning (`caption`: CIDEr)
                and, for arms that train ARef, the model's own zero-shot ARef (`rec`:
                Acc@0.5, mIoU; no transfer).
  2. probe      in the same workdir: a linear probe on the frozen, mean-pooled encoder
                features (`evaluators/probe.py`: which colours / kinds / sizes / colour-kind
                pairs an image holds (mAP) and its object count (accuracy)); fit on train,
                strength chosen on validation, scored on test; appended to metrics.jsonl.
  3. transfer   WORKDIR/<arm>/seed<k>/transfer: the paper's Table 2 protocol,
                configs/transfer/refcoco.py: the encoder (`img/.*`) loaded from the pretrain
                workdir and frozen, a fresh decoder trained on ARef rows (the same transfer
                config for every arm), `rec` on the test split at the last step.

Then it writes `--out` (Markdown: per metric, mean ± std over seeds per arm, and every
per-seed value; the arms' config overrides; the shared settings; commands; wall times;
machine and versions) and `--out` with suffix .json (every run's final metrics, read back
from its metrics.jsonl). Every number in the report is read from the runs' metrics.jsonl files.

Resuming: a stage whose final checkpoint and final-step results exist is skipped; a stage
interrupted mid-training resumes from its last checkpoint (the trainer's own resume); one
whose final checkpoint exists but whose results are missing is evaluated from that checkpoint.
So rerunning an interrupted study continues it. A workdir whose config.json differs from the
config the study would run (another --scale, another code version) is an error, not a reuse.

Carrying runs across machines: every finished arm x seed is recorded in `--out`'s .json with
each stage's config and where and when it was read (`recorded`). A later invocation with the
same --out keeps the recorded arm x seeds whose configs equal the ones it would run (workdir
paths aside) and runs only the rest, so a study longer than one machine's lease grows, run by
run, on fresh checkouts; a recorded run whose config differs is rerun (logged), and
--nokeep_recorded reruns them all. A run finished under --workdir wins over its record. The
report says which runs it carried and from which invocation (git commit, date).

Equal compute per arm: every arm trains the same encoder and decoder for the same number of
steps at the same batch size with the same optimizer and schedule, so every encoder sees the
same images, the same number of times. The decoder work is NOT equal: the decoder runs one
row per task per image (Cap / CapPa 1, the LocCa ablations 2, LocCa 3), as in the paper,
which also compares at equal examples seen. The report lists each arm's rows per image and its
measured training throughput.

Scale (`--scale`): `tiny` (the test suite's model and `locca_shapes/tiny`, a few steps: a smoke
run), `default` (configs/locca_b16.py:runlocal's model at 64 px on `locca_shapes/colors`,
batch 32, 200 pretraining + 100 transfer steps: 6 arms x 3 seeds in about 30 minutes on a
2-core CPU of its own, estimated from measured step times; under 40), `full` (the default x 35:
7000 pretraining + 3500 transfer steps, past the point where ARef's readout is learned;
docs/RESULTS.md; about 15 hours on 2 CPU cores, minutes per run on one accelerator), or a
positive number m: the default scale with every step count (pretraining, transfer, warmup,
checkpoint interval) times m. See SCALES. The model is the same at every scale but `tiny`, so
scales differ in training length. The default and `full` train on `colors` (1-3 squares:
referents told apart by colour, size and position) rather than `base` (shapes, too): this
model learns shapes far too slowly for a CPU study (docs/experiments/README.md, 6-8);
`--dataset` replaces the scale's locca_shapes config, e.g. `--dataset=base`.

Order and partial reports: seed by seed (every arm at seed 0 first), and the report is
rewritten after each arm x seed, so an interrupted study leaves a report of the runs it
finished, marked partial, its arms compared on the same seeds so far.

One process: the study runs the stages one after another in this process (for multi-host
training, run `python -m locca_jax.train` per stage with the overrides the report lists).
"""
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from configs import locca_b16
from configs.transfer import refcoco
from locca_jax import evaluate
from locca_jax import metrics as metrics_lib
from locca_jax import sharding
from locca_jax import train
from locca_jax.data import input_pipeline
from locca_jax.data import locca_shapes
from locca_jax.evaluators import common
from locca_jax.evaluators import probe
from locca_jax.models import locca

BASE_CONFIG = "configs/locca_b16.py:runlocal"
TRANSFER_CONFIG = "configs/transfer/refcoco.py:runlocal"
DEFAULT_ROOT = "workdirs/study"


# ------------------------------------------------------------------------------ arms
def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def _cap(config):
  c = _copy(config)
  c.input.tasks = ("cap",)
  c.model.parallel_fraction = 0.0
  return c


def _cappa(config):
  c = _cap(config)
  c.model.parallel_fraction = 0.75
  return c


def _locca(config):
  c = _copy(config)
  c.input.tasks = ("cap", "aref", "gcap")
  c.model.parallel_fraction = 0.0
  return c


def _locca_no_aref(config):
  c = _locca(config)
  c.input.tasks = ("cap", "gcap")
  return c


def _locca_no_gcap(config):
  c = _locca(config)
  c.input.tasks = ("cap", "aref")
  return c


def _locca_loc(config):
  c = _locca(config)
  c.input.tokenizer.box_codec = "loc"
  return c


@dataclasses.dataclass(frozen=True)
class Arm:
  """A pretraining recipe: `transform(config) -> config`, pure (returns a new config)."""
  name: str
  title: str
  description: str
  transform: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict]


ARMS = {a.name: a for a in (
    Arm("cap", "Cap", "captioning only (configs/cap_b16.py)", _cap),
    Arm("cappa", "CapPa", "captioning, 75% of the Cap rows with parallel prediction "
        "(configs/cappa_b16.py)", _cappa),
    Arm("locca", "LocCa", "Cap + ARef + GCap, boxes as text digits (configs/locca_b16.py)",
        _locca),
    Arm("locca_no_aref", "LocCa w/o ARef", "LocCa without the ARef loss: the ARef row "
        "dropped (the same gradient as an ARef row with every loss flag off)", _locca_no_aref),
    Arm("locca_no_gcap", "LocCa w/o GCap", "LocCa without the GCap loss: the GCap row dropped",
        _locca_no_gcap),
    Arm("locca_loc", "LocCa <loc>", "LocCa with boxes as dedicated <loc> tokens "
        "(config.input.tokenizer.box_codec='loc')", _locca_loc),
)}


# ------------------------------------------------------------------------------ scales
@dataclasses.dataclass(frozen=True)
class Scale:
  """Sizes shared by every arm: data, model, steps, evaluation sizes."""
  name: str
  dataset: str                # locca_shapes builder config
  batch_size: int
  pretrain_steps: int
  pretrain_warmup: int
  transfer_steps: int
  transfer_warmup: int
  ckpt_every: int             # pretraining; the transfer checkpoints at its end
  log_every: int
  eval_images: int | None     # test images for caption / rec (None: the whole split)
  eval_batch: int
  probe_examples: tuple       # (train, select, test) images; None: the whole split
  model: dict | None = None   # config.model.{encoder, decoder} overrides (None: runlocal's)
  image_size: int | None = None
  shuffle_buffer: int | None = None


SCALES = {
    # The test suite's model (tests/conftest.py) on locca_shapes/tiny: seconds per stage.
    "tiny": Scale("tiny", "tiny", batch_size=8, pretrain_steps=4, pretrain_warmup=1,
                  transfer_steps=3, transfer_warmup=1, ckpt_every=4, log_every=2,
                  eval_images=8, eval_batch=8, probe_examples=(None, None, None),
                  model=dict(encoder=dict(variant="mu/8", width=32, depth=1, mlp_dim=64,
                                          num_heads=2, posemb="learn"),
                             decoder=dict(num_layers=1, width=None, mlp_dim=None,
                                          num_heads=None, use_bias=True)),
                  image_size=32, shuffle_buffer=64),
    # runlocal's model (ViT 4x128 at 64 px, 2-layer decoder), batch 32: ~40 min on 2 cores.
    # On `colors`, not `base`: this model learns shapes far too slowly for a CPU study
    # (docs/experiments/README.md, 6-8), and LocCa's question (which object, where) needs none.
    "default": Scale("default", "colors", batch_size=32, pretrain_steps=200,
                     pretrain_warmup=20, transfer_steps=100, transfer_warmup=10,
                     ckpt_every=50, log_every=10, eval_images=200, eval_batch=40,
                     probe_examples=(2048, 512, 1000)),
}


def multiplied(base: Scale, m: float, name: str) -> Scale:
  """`base` with every step count (pretraining, transfer, warmups, checkpoint interval) x m."""
  steps = lambda n: max(1, round(n * m))
  pretrain, transfer = max(2, steps(base.pretrain_steps)), max(2, steps(base.transfer_steps))
  return dataclasses.replace(
      base, name=name, pretrain_steps=pretrain, transfer_steps=transfer,
      pretrain_warmup=min(steps(base.pretrain_warmup), pretrain - 1),
      transfer_warmup=min(steps(base.transfer_warmup), transfer - 1),
      ckpt_every=min(steps(base.ckpt_every), pretrain))


# The size of docs/RESULTS.md: 7000 pretraining + 3500 transfer steps, past the step count
# at which ARef's readout breaks out of its plateau on `colors` (2000-4000 steps,
# docs/experiments/README.md, 10). About 1 h per LocCa arm x seed on 2 CPU cores (the whole
# study: about 15 h, resumable); minutes per run on one accelerator.
SCALES["full"] = multiplied(SCALES["default"], 35, "full")


def parse_scale(value: str) -> Scale:
  """--scale: a name of SCALES, or a positive number m (the default scale's steps times m)."""
  if value in SCALES:
    return SCALES[value]
  try:
    m = float(value)
  except ValueError:
    m = math.nan
  if not m > 0 or math.isinf(m):
    raise ValueError(f"--scale={value!r}: expected one of {sorted(SCALES)} or a positive "
                     "number (a multiplier of the default scale's steps)")
  return multiplied(SCALES["default"], m, f"default x {m:g}")


# ------------------------------------------------------------------------------ configs
def _scaled(config: ml_collections.ConfigDict, scale: Scale, data_dir: str | None, *,
            steps: int, warmup: int, ckpt_every: int) -> ml_collections.ConfigDict:
  """`config` on the scale's data and model, with these step counts."""
  c = _copy(config)
  c.input.data = dict(name=f"locca_shapes/{scale.dataset}", split="train", data_dir=data_dir)
  c.input.batch_size = scale.batch_size
  if scale.image_size is not None:
    c.input.image_size = scale.image_size
  if scale.shuffle_buffer is not None:
    c.input.shuffle_buffer = scale.shuffle_buffer
  if scale.model is not None:
    c.model.encoder = dict(scale.model["encoder"])
    c.model.decoder = dict(scale.model["decoder"])
  c.total_steps = steps
  c.schedule.warmup_steps = warmup
  c.ckpt_every = ckpt_every
  c.keep_ckpts = 1
  c.log_every = scale.log_every
  return c


def _test_eval(config, name: str, scale: Scale):
  """config.evals.NAME on the first `eval_images` test images, run at the last step only."""
  ev = config.evals[name]
  ev.data = dict(name=f"locca_shapes/{scale.dataset}", split="test")
  ev.max_examples = scale.eval_images
  ev.batch_size = scale.eval_batch
  ev.log_steps = config.total_steps


def pretrain_config(arm: str, scale: Scale, seed: int,
                    data_dir: str | None = None) -> ml_collections.ConfigDict:
  """The arm's pretraining config: ARMS[arm] of the scaled runlocal config, test evals."""
  base = _scaled(locca_b16.get_config("runlocal"), scale, data_dir,
                 steps=scale.pretrain_steps, warmup=scale.pretrain_warmup,
                 ckpt_every=scale.ckpt_every)
  c = ARMS[arm].transform(base)
  c.seed = seed
  keep = ["caption"] + (["rec"] if "aref" in c.input.tasks else [])
  for name in list(c.evals.keys()):
    if name not in keep:
      del c.evals[name]
  for name in keep:
    _test_eval(c, name, scale)
  return c


def transfer_config(scale: Scale, seed: int, pretrain_workdir: str,
                    data_dir: str | None = None) -> ml_collections.ConfigDict:
  """configs/transfer/refcoco.py:runlocal at this scale, from `pretrain_workdir`'s encoder."""
  c = _scaled(refcoco.get_config("runlocal"), scale, data_dir, steps=scale.transfer_steps,
              warmup=scale.transfer_warmup, ckpt_every=scale.transfer_steps)
  c.seed = seed
  c.init_from.workdir = pretrain_workdir
  for name in list(c.evals.keys()):  # the protocol reports rec only
    if name != "rec":
      del c.evals[name]
  _test_eval(c, "rec", scale)
  return c


def probe_eval(scale: Scale) -> dict:
  """The `probe` evaluator's config (see locca_jax/evaluators/probe.py)."""
  train_n, select_n, test_n = scale.probe_examples
  return dict(type="probe", data=dict(name=f"locca_shapes/{scale.dataset}", split="test"),
              train_split="train", select_split="validation", train_examples=train_n,
              select_examples=select_n, max_examples=test_n, labels=probe.DEFAULT_LABELS,
              pairs=probe.DEFAULT_PAIRS, l2_grid=probe.DEFAULT_L2_GRID,
              batch_size=scale.eval_batch)


# ------------------------------------------------------------------------------ config diffs
def flatten(tree, prefix: str = "") -> dict:
  """{"a.b.c": leaf} of a ConfigDict / nested dict; tuples and lists are leaves."""
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict) or hasattr(value, "to_dict"):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def _normalized(value):
  """Tuples as lists (a config read back from JSON holds lists)."""
  if isinstance(value, (tuple, list)):
    return [_normalized(v) for v in value]
  return value


def config_diff(base, config) -> tuple[dict, list[str]]:
  """({path: new value} changed or added, [removed paths]) of `config` against `base`.

  A removed subtree (e.g. evals.gcap) is listed once, by its top-most missing node.
  """
  a, b = flatten(base), flatten(config)
  changed = {k: v for k, v in b.items() if k not in a or _normalized(a[k]) != _normalized(v)}
  removed = []
  for k in sorted(k for k in a if k not in b):
    parts = k.split(".")
    for n in range(1, len(parts) + 1):
      node = ".".join(parts[:n])
      if not any(x == node or x.startswith(node + ".") for x in b):
        if node not in removed:
          removed.append(node)
        break
  return changed, removed


_PLAIN = re.compile(r"^[\w./:@+=-]*$")  # needs no shell quoting


def flag_line(path: str, value) -> str:
  """`--config.<path>=<value>` as one shell word (ml_collections parses the literal)."""
  if isinstance(value, list):
    value = tuple(value)
  word = f"--config.{path}={value if isinstance(value, str) else repr(value)}"
  if _PLAIN.match(word):
    return word
  return f'"{word}"' if not set(word) & set('"$`\\!') else shlex.quote(word)


def _train_command(config_name: str, base, config, workdir: str) -> list[str]:
  """The `python -m locca_jax.train` command running `config` (as overrides of `base`), one
  flag per line, then the fields no flag can remove, as comments."""
  overrides = override_lines(base, config)
  return ([f"python -m locca_jax.train --config={config_name} \\"]
          + [f"    {l} \\" for l in overrides if not l.startswith("#")]
          + [f"    --workdir={workdir}", ""]
          + [l for l in overrides if l.startswith("#")])


def override_lines(base, config) -> list[str]:
  changed, removed = config_diff(base, config)
  lines = [flag_line(k, v) for k, v in sorted(changed.items())]
  lines += [f"# and without config.{k} (no flag deletes a field: the study drops it)"
            for k in removed]
  return lines


# ------------------------------------------------------------------------------ run state
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


def _missing_results(config, workdir: str, extra=()) -> list[str]:
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
  changed, removed = config_diff(existing, json.loads(config.to_json()))
  if changed or removed:
    fields = [f"{k}: {flatten(existing).get(k)!r} -> {v!r}" for k, v in sorted(changed.items())]
    fields += [f"{k}: removed" for k in removed]
    raise ValueError(f"{path}: this workdir was made with another config than the study would "
                     f"run now ({'; '.join(fields[:6])}); use another --workdir or delete "
                     f"{workdir}")


def _timing_path(workdir: str) -> str:
  return os.path.join(workdir, "study_timing.json")


def _read_timing(workdir: str) -> dict:
  path = _timing_path(workdir)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_timing(workdir: str, stage: str, wall_s: float, resumed_from: int | None):
  """Adds this invocation's seconds on `stage` to WORKDIR/study_timing.json (an invocation
  killed mid-stage records nothing: its time is lost, its checkpoints are not)."""
  timing = _read_timing(workdir)
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
  missing = _missing_results(config, workdir)
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
    missing = _missing_results(config, workdir)
  if missing:  # e.g. the process died during the last step's evaluations
    results = evaluate.evaluate_checkpoint(config, workdir, step=step, names=missing)
    _append_evals(config, workdir, step, {k: v for k, v in results.items() if k != "step"})
  _write_timing(workdir, stage, time.monotonic() - start, resumed_from)
  return status


def ensure_probe(config, workdir: str, probe_cfg: dict) -> str:
  """Runs the linear probe on the final checkpoint of `workdir` unless its results exist."""
  step = config.total_steps
  if not _missing_results(config, workdir, extra=["probe"]):
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


# ------------------------------------------------------------------------------ the study
@dataclasses.dataclass(frozen=True)
class Metric:
  """A reported number: `key` of the final-step metrics of a stage's metrics.jsonl."""
  name: str
  stage: str   # "pretrain" or "transfer"
  key: str
  title: str
  short: str   # the summary table's column
  reference: tuple = ()  # (key, what): a baseline logged with it, e.g. the chance level


METRICS = (
    Metric("transfer_rec_acc", "transfer", "rec/acc@0.5",
           "Frozen-encoder REC transfer: Acc@0.5 (test)", "transfer Acc@0.5"),
    Metric("transfer_rec_miou", "transfer", "rec/miou",
           "Frozen-encoder REC transfer: mIoU (test)", "transfer mIoU"),
    Metric("zeroshot_rec_acc", "pretrain", "rec/acc@0.5",
           "Zero-shot ARef of the pretrained model, no transfer: Acc@0.5 (test)",
           "zero-shot Acc@0.5"),
    Metric("zeroshot_rec_miou", "pretrain", "rec/miou",
           "Zero-shot ARef of the pretrained model, no transfer: mIoU (test)", "zero-shot mIoU"),
    Metric("caption_cider", "pretrain", "caption/cider",
           "Captioning CIDEr of the pretrained model (test)", "CIDEr"),
    Metric("probe_map", "pretrain", "probe/map",
           "Linear probe on the frozen encoder: attribute-presence mAP (test)", "probe mAP",
           ("probe/map_chance", "chance level (mean prevalence of the scored labels)")),
    Metric("probe_count_acc", "pretrain", "probe/count_acc",
           "Linear probe on the frozen encoder: object-count accuracy (test)", "probe count acc",
           ("probe/count_majority", "always predicting the most frequent training count")),
)


def run_workdirs(root: str, arm: str, seed: int) -> dict[str, str]:
  run = os.path.join(root, arm, f"seed{seed}")
  return dict(pretrain=os.path.join(run, "pretrain"), transfer=os.path.join(run, "transfer"))


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
  arms = list(arms) if arms else list(ARMS)
  unknown = [a for a in arms if a not in ARMS]
  if unknown or len(set(arms)) != len(arms):
    raise ValueError(f"--arms={','.join(arms)}: expected distinct names of {list(ARMS)}")
  return arms


def with_dataset(sc: Scale, dataset: str | None) -> Scale:
  """The scale on another locca_shapes builder config (None or "": the scale's own)."""
  if not dataset:
    return sc
  names = list(locca_shapes.LoccaShapes.builder_configs)
  if dataset not in names:
    raise ValueError(f"--dataset={dataset!r}: expected a locca_shapes config, one of {names}")
  return dataclasses.replace(sc, dataset=dataset)


def run_study(*, out: str, root: str = DEFAULT_ROOT, seeds=(0, 1, 2), scale: str = "default",
              arms=None, data_dir: str | None = None, command: str | None = None,
              dataset: str | None = None, keep_recorded: bool = True) -> dict:
  """Runs (or resumes) every stage of every arm x seed, then writes the report.

  Seed by seed (every arm at the first seed, then the next seed), and the report is rewritten
  after each arm x seed: an interrupted long study leaves a report of the runs it finished,
  marked partial, with every arm compared on the same seeds so far. `dataset` (a
  locca_shapes config) replaces the scale's. `keep_recorded`: keep the arm x seeds recorded
  in `out`'s .json with the same configs (see recorded_runs) instead of running them.
  Returns {"runs": [{arm, seed, stage, status}],
  "report": out, "json": ...}.
  """
  seeds, arms = _parse_seeds(seeds), _parse_arms(arms)
  sc = with_dataset(parse_scale(str(scale)), dataset)
  root = os.path.abspath(root)
  if command is None:
    command = shlex.join(["python", "-m", "locca_jax.study", *sys.argv[1:]])
  started, machine = time.monotonic(), machine_info()
  locca_shapes.prepare(sc.dataset, data_dir)  # generated once, on first use
  json_path = _json_path(out)
  carried = (recorded_runs(json_path, root, arms, seeds, sc, data_dir) if keep_recorded
             else {arm: {} for arm in arms})
  statuses = []
  for seed in seeds:
    for arm in arms:
      dirs = run_workdirs(root, arm, seed)
      if str(seed) in carried[arm] and not _finished(
          _stage_configs(arm, sc, seed, root, data_dir), dirs):
        logging.info("study: %s seed %d: kept as recorded in %s", arm, seed, json_path)
        statuses += [dict(arm=arm, seed=seed, stage=stage, status="recorded")
                     for stage in ("pretrain", "probe", "transfer")]
        continue
      cfg = pretrain_config(arm, sc, seed, data_dir)
      logging.info("study: %s seed %d: pretraining in %s", arm, seed, dirs["pretrain"])
      statuses.append(dict(arm=arm, seed=seed, stage="pretrain",
                           status=ensure_trained(cfg, dirs["pretrain"], "pretrain")))
      statuses.append(dict(arm=arm, seed=seed, stage="probe",
                           status=ensure_probe(cfg, dirs["pretrain"], probe_eval(sc))))
      tcfg = transfer_config(sc, seed, dirs["pretrain"], data_dir)
      logging.info("study: %s seed %d: frozen-encoder transfer in %s", arm, seed,
                   dirs["transfer"])
      statuses.append(dict(arm=arm, seed=seed, stage="transfer",
                           status=ensure_trained(tcfg, dirs["transfer"], "transfer")))
      json_path = write_report(out, root=root, arms=arms, seeds=seeds, sc=sc,
                               data_dir=data_dir, command=command,
                               wall=time.monotonic() - started, statuses=statuses,
                               machine=machine, carried=carried)
  json_path = write_report(out, root=root, arms=arms, seeds=seeds, sc=sc, data_dir=data_dir,
                           command=command, wall=time.monotonic() - started,
                           statuses=statuses, machine=machine, carried=carried)
  logging.info("study: wrote %s and %s (%.0fs)", out, json_path, time.monotonic() - started)
  return dict(runs=statuses, report=out, json=json_path)


def write_report(out: str, *, root: str, arms, seeds, sc: Scale, data_dir, command: str,
                 wall: float, statuses, machine: dict, carried: dict | None = None) -> str:
  """Writes `out` (Markdown) and `out` with suffix .json from the runs finished under `root`
  and the `carried` ones (recorded_runs) it has not; returns the .json path. `machine`:
  machine_info() when the study started (the code it runs)."""
  generated = datetime.datetime.now().isoformat(timespec="seconds")
  found = collect(root, arms, seeds, sc, data_dir)
  results = {}
  for arm in arms:
    results[arm] = {}
    for seed in map(str, seeds):
      if seed in found[arm]:
        run = found[arm][seed]
        run["recorded"] = dict(generated=generated, git_commit=machine["git_commit"],
                               host=machine["platform"], workdir=root, carried=False)
      elif carried and seed in carried[arm]:
        run = dict(carried[arm][seed], recorded=dict(carried[arm][seed].get("recorded", {}),
                                                     carried=True))
      else:
        continue
      results[arm][seed] = run
  json_path = _json_path(out)
  meta = dict(command=command, scale=dataclasses.asdict(sc), seeds=seeds, arms=arms,
              workdir=root, data_dir=data_dir, invocation_wall_s=wall, generated=generated,
              machine=machine)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(json_path, "w") as f:
    json.dump(dict(meta, runs=results, statuses=statuses), f, indent=1, sort_keys=True)
  with open(out, "w") as f:
    f.write(render_report(meta, results, sc, data_dir, os.path.basename(json_path)))
  return json_path


def _json_path(out: str) -> str:
  """The report's .json: every run's numbers, and the record later invocations carry."""
  return os.path.splitext(out)[0] + ".json"


def collect(root: str, arms, seeds, sc: Scale, data_dir) -> dict:
  """{arm: {seed: {stage: {metrics, wall_s, ...}}}} read back from the runs' files, for the
  arm x seeds that finished: every stage at its last step with all its evaluations logged
  (pretraining's, the probe's, the transfer's); the others are left out."""
  out = {}
  for arm in arms:
    out[arm] = {}
    for seed in seeds:
      dirs, configs = run_workdirs(root, arm, seed), _stage_configs(arm, sc, seed, root,
                                                                     data_dir)
      if not _finished(configs, dirs):
        continue
      out[arm][str(seed)] = {
          stage: dict(workdir=workdir, step=configs[stage].total_steps,
                      metrics=final_step_metrics(workdir, configs[stage].total_steps),
                      timing=_read_timing(workdir), img_per_sec=_median_img_per_sec(workdir),
                      config=portable_config(configs[stage], root))
          for stage, workdir in dirs.items()}
  return out


def _stage_configs(arm: str, sc: Scale, seed: int, root: str, data_dir) -> dict:
  return dict(pretrain=pretrain_config(arm, sc, seed, data_dir),
              transfer=transfer_config(sc, seed, run_workdirs(root, arm, seed)["pretrain"],
                                       data_dir))


def _finished(configs: dict, dirs: dict) -> bool:
  """Whether every stage (`_stage_configs`, `run_workdirs`) logged all its final evaluations."""
  extra = dict(pretrain=["probe"], transfer=[])
  return not any(_missing_results(configs[st], dirs[st], extra[st]) for st in dirs)


def portable_config(config, root: str) -> dict:
  """The flattened config with paths under `root` written relative to it ("<workdir>/..."),
  so that runs made under another --workdir, on another machine, compare equal."""
  prefix = os.path.abspath(root) + os.sep
  return {k: ("<workdir>/" + v[len(prefix):] if isinstance(v, str) and v.startswith(prefix)
              else _normalized(v))
          for k, v in flatten(config).items()}


def recorded_runs(json_path: str, root: str, arms, seeds, sc: Scale, data_dir) -> dict:
  """{arm: {seed: run}} of the arm x seeds an earlier invocation recorded in `json_path` (an
  earlier report's .json) whose every stage's config equals the one this study would run
  (but for the workdir and data_dir paths).

  A recorded run with another config (another scale, a changed arm) is left out, and logged.
  """
  if not os.path.exists(json_path):
    return {arm: {} for arm in arms}
  with open(json_path) as f:
    recorded = json.load(f).get("runs", {})
  out = {}
  for arm in arms:
    out[arm] = {}
    for seed in seeds:
      run = recorded.get(arm, {}).get(str(seed))
      if run is None:
        continue
      expected = _stage_configs(arm, sc, seed, root, data_dir)
      differences = []
      for stage, config in expected.items():
        if "config" not in run.get(stage, {}):
          differences.append(f"{stage}: no config recorded")
          continue
        changed, removed = config_diff(run[stage]["config"], portable_config(config, root))
        differences += [f"{stage} {k}: {run[stage]['config'].get(k)!r} -> {v!r}"
                        for k, v in sorted(changed.items())
                        if not k.endswith("data_dir")]  # where the data is, not what
        differences += [f"{stage} {k}: removed" for k in removed]
      if differences:
        logging.warning("study: %s records %s seed %d with another config than this study "
                        "runs (%s); it will be rerun", json_path, arm, seed,
                        "; ".join(differences[:4]))
        continue
      out[arm][str(seed)] = run
  return out


def _median_img_per_sec(workdir: str) -> float | None:
  values = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "img_per_sec" in record:
        values.append(record["img_per_sec"])
  return float(np.median(values)) if values else None


# ------------------------------------------------------------------------------ report
def mean_std(values) -> tuple[float, float | None]:
  """(mean, sample std with ddof=1, or None for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def fmt(value: float) -> str:
  """How every number appears in the report (4 decimals)."""
  return f"{value:.4f}"


def _cell(values) -> str:
  if not values:
    return "n/a"
  mean, std = mean_std(values)
  return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def metric_values(results: dict, arm: str, metric: Metric) -> list[float]:
  """The metric's per-seed values of `arm` (seed order); [] where the arm has none."""
  values = []
  for seed in results[arm]:
    m = results[arm][seed][metric.stage]["metrics"]
    if metric.key in m:
      values.append(float(m[metric.key]))
  return values


def machine_info() -> dict:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow",
              "tensorflow-datasets", "numpy", "ml_collections"):
    try:
      versions[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      versions[pkg] = None
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
    commit = head.stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
    if status.stdout.strip():
      commit += " (with uncommitted changes)"
  except (OSError, subprocess.CalledProcessError):
    commit = None
  return dict(platform=platform.platform(), processor=platform.processor() or None,
              cpu_count=os.cpu_count(), python=platform.python_version(),
              devices=[str(d) for d in jax.devices()], backend=jax.default_backend(),
              versions=versions, git_commit=commit)


def render_report(meta: dict, results: dict, sc: Scale, data_dir, json_name: str) -> str:
  """The Markdown report: tables, overrides, commands, wall times, machine."""
  arms, seeds = meta["arms"], meta["seeds"]
  n = len(seeds)
  lines = ["# LocCa study in miniature: results", "",
           f"Produced by `{meta['command']}` ({meta['generated']}). Every number is read "
           f"from the runs' `metrics.jsonl` under `{meta['workdir']}`, or, for runs this "
           "invocation carried from an earlier one's record, where that one read them "
           f"(see Provenance); every per-run number is in `{json_name}`.", "",
           f"Scale `{sc.name}` (`locca_shapes/{sc.dataset}`), seeds {', '.join(map(str, seeds))}"
           f" (n = {n}). Cells: mean ± std over seeds, std = sample standard deviation "
           "(numpy, ddof=1)" + ("" if n > 1 else "; with one seed, the value alone") + ". "
           f"Evaluations on the test split (first {sc.eval_images or 'all'} images for caption "
           f"/ rec; probe on {sc.probe_examples[2] or 'all'} test images).", "",
           "## Summary", ""]
  pending = [f"{a} seed {s}" for s in seeds for a in arms if str(s) not in results[a]]
  if pending:
    lines[-2:-2] = [
        f"**Partial**: {len(arms) * n - len(pending)} of {len(arms) * n} runs (arm x seed) "
        "finished; pending (cells `pending`, left out of the means): "
        f"{', '.join(pending)}. Rerun the command to continue.", ""]
  lines.append("| arm | " + " | ".join(m.short for m in METRICS) + " |")
  lines.append("|---" * (len(METRICS) + 1) + "|")
  for arm in arms:
    lines.append(f"| {ARMS[arm].title} | " + " | ".join(
        _cell(metric_values(results, arm, m)) if results[arm] else "pending"
        for m in METRICS) + " |")
  lines += ["", "n/a: the arm does not train ARef, so it has no zero-shot ARef.", ""]

  for m in METRICS:
    note = f"`{m.key}` at the last step of the {m.stage} runs."
    if m.reference:
      ref = [float(run[m.stage]["metrics"][m.reference[0]])
             for a in arms for run in results[a].values()
             if m.reference[0] in run[m.stage]["metrics"]]
      if ref:
        note += f" Baseline, {m.reference[1]}: {fmt(float(np.mean(ref)))} (`{m.reference[0]}`)."
    lines += [f"## {m.title}", "", note, "",
              "| arm | mean ± std | n | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---" * (3 + n) + "|"]
    for arm in arms:
      per_seed = []
      for s in seeds:
        run = results[arm].get(str(s))
        v = None if run is None else run[m.stage]["metrics"].get(m.key)
        per_seed.append("pending" if run is None else "n/a" if v is None else fmt(float(v)))
      values = metric_values(results, arm, m)
      lines.append(f"| {ARMS[arm].title} | {_cell(values)} | {len(values)} | "
                   + " | ".join(per_seed) + " |")
    lines.append("")

  base = _scaled(locca_b16.get_config("runlocal"), sc, data_dir, steps=sc.pretrain_steps,
                 warmup=sc.pretrain_warmup, ckpt_every=sc.ckpt_every)
  lines += ["## Arms", "",
            f"Each arm is a pure transformation of `{BASE_CONFIG}` (`locca_jax.study.ARMS`). "
            "Equal compute per arm = the same encoder and decoder, the same "
            f"{sc.pretrain_steps} steps at batch {sc.batch_size} "
            f"({sc.pretrain_steps * sc.batch_size} images seen per arm), the same optimizer "
            "and schedule. The decoder work is not equal: one decoder row per task per image "
            "(the paper, too, compares at equal examples seen); the measured training "
            "throughput shows the cost.", "",
            "| arm | what | decoder rows / image | train img/s (median) | pretrain s | probe s "
            "| transfer s |", "|---|---|---|---|---|---|---|"]
  for arm in arms:
    cfg = pretrain_config(arm, sc, seeds[0], data_dir)
    runs = results[arm].values()
    ips = [r["pretrain"]["img_per_sec"] for r in runs if r["pretrain"]["img_per_sec"]]
    wall = lambda stage, key: [r[stage]["timing"][key]["wall_s"] for r in runs
                               if key in r[stage]["timing"]]
    walls = [_wall_cell(wall(st, key)) for st, key in (
        ("pretrain", "pretrain"), ("pretrain", "probe"), ("transfer", "transfer"))]
    lines.append(f"| {ARMS[arm].title} | {ARMS[arm].description} | {len(cfg.input.tasks)} | "
                 f"{f'{np.mean(ips):.1f}' if ips else 'n/a'} | " + " | ".join(walls) + " |")
  lines += ["", "Wall times (s): mean over seeds of the time the study's invocations spent on "
            "each stage (an invocation killed mid-stage is not counted); pretrain and transfer "
            "include their final evaluations.", "",
            "Overrides of each arm against the scaled base config (below):", ""]
  for arm in arms:
    lines += [f"**{ARMS[arm].title}** (`--arms={arm}`):", "", "```"]
    lines += override_lines(base, ARMS[arm].transform(base)) or ["(none: the base config)"]
    lines += ["```", ""]

  example = pretrain_config(arms[0], sc, seeds[0], data_dir)
  example_dirs = run_workdirs(meta["workdir"], arms[0], seeds[0])
  transfer = transfer_config(sc, seeds[0], example_dirs["pretrain"], data_dir)
  lines += ["## Shared settings and commands", "",
            f"Pretraining = `{BASE_CONFIG}` with these overrides (the scale, the seed, the "
            "test-split evaluators), then the arm's overrides; shown for "
            f"`{arms[0]}`, seed {seeds[0]}:", "", "```"]
  lines += _train_command(BASE_CONFIG, locca_b16.get_config("runlocal"), example,
                          example_dirs["pretrain"])
  lines += ["```", "", f"Transfer = `{TRANSFER_CONFIG}` with (every arm alike; "
            "`init_from.workdir` = that run's pretrain workdir):", "", "```"]
  lines += _train_command(TRANSFER_CONFIG, refcoco.get_config("runlocal"), transfer,
                          example_dirs["transfer"])
  lines += ["```", "",
            "Probe (`locca_jax/evaluators/probe.py`, run by the study on the pretrain "
            "checkpoint; results appended to its metrics.jsonl as `probe/*`):", "", "```",
            json.dumps(probe_eval(sc)), "```", "",
            "Each run's complete config is its `config.json`; workdirs are "
            f"`{meta['workdir']}/<arm>/seed<k>/{{pretrain,transfer}}`.", "",
            f"Wall time of this invocation: {meta['invocation_wall_s']:.0f} s (stages it "
            "skipped as complete cost nothing).", "",
            "## Provenance", "",
            "Where and when each run's numbers were read from its workdir's files, by which "
            "code. Carried: kept from the record of an earlier invocation of this command "
            "(another machine or checkout) whose configs equal this invocation's, not rerun.",
            "", "| arm | seed | read from | read at | git commit | carried |",
            "|---|---|---|---|---|---|"]
  for arm in arms:
    for seed, run in results[arm].items():
      rec = run.get("recorded", {})
      lines.append(f"| {ARMS[arm].title} | {seed} | `{rec.get('workdir', '?')}` on "
                   f"{rec.get('host', '?')} | {rec.get('generated', '?')} | "
                   f"{rec.get('git_commit') or 'unknown'} | "
                   f"{'yes' if rec.get('carried') else 'no'} |")
  lines += ["", "## Machine", "", "This invocation's:", ""]
  mi = meta["machine"]
  lines += [f"- {mi['platform']}, {mi['cpu_count']} CPUs, backend `{mi['backend']}`, devices "
            f"{', '.join(mi['devices'])}",
            f"- Python {mi['python']}; " + ", ".join(
                f"{k} {v}" for k, v in mi["versions"].items() if v),
            f"- git commit {mi['git_commit'] or 'unknown'}", ""]
  return "\n".join(lines)


def _wall_cell(values) -> str:
  return f"{np.mean(values):.0f}" if values else "n/a"


# ------------------------------------------------------------------------------ main
def _define_flags():
  """The command's flags; defined only when run as a program (as evaluate.py does), so that
  importing this module defines no flags. --workdir is the trainer's (locca_jax.train defines
  it on import): here, the root of the study's runs."""
  flags.declare_key_flag("workdir")
  return dict(
      out=flags.DEFINE_string("out", None, "The Markdown report to write (and <out>.json)."),
      seeds=flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed) of every arm."),
      scale=flags.DEFINE_string("scale", "default", f"One of {sorted(SCALES)}, or a positive "
                                "multiplier of the default scale's steps."),
      arms=flags.DEFINE_list("arms", list(ARMS), f"Arms to run, of {list(ARMS)}."),
      dataset=flags.DEFINE_string("dataset", None, "A locca_shapes config replacing the "
                                  "scale's (e.g. colors: 1-3 squares, referents told apart "
                                  "by colour, size, position); default: the scale's."),
      data_dir=flags.DEFINE_string("data_dir", None, "TFDS data_dir of locca_shapes "
                                   "(default: ~/tensorflow_datasets)."),
      keep_recorded=flags.DEFINE_bool("keep_recorded", True, "Keep the arm x seeds that "
                                      "<out>.json records with this study's configs (run "
                                      "earlier, maybe elsewhere) instead of rerunning them."))


def main(argv, flag_values):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if flags.FLAGS["config"].present:
    raise app.UsageError("--config is not a study flag: the arms are built from "
                         f"{BASE_CONFIG} (see locca_jax.study.ARMS and SCALES)")
  # The trainer's filter: orbax's per-save INFO lines stay out of the progress log.
  quiet = train._quiet_library_info  # pylint: disable=protected-access
  logging.get_absl_handler().addFilter(quiet)
  # TensorFlow only feeds the input pipeline: keep it off the accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  root = flags.FLAGS.workdir or DEFAULT_ROOT
  # Programs that recur across runs (every seed's train step, every arm's transfer) compile
  # once: JAX's persistent compilation cache, kept with the runs.
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(root),
                                                              "jax_cache"))
  run_study(out=flag_values["out"].value, root=root,
            seeds=flag_values["seeds"].value, scale=flag_values["scale"].value,
            arms=flag_values["arms"].value, data_dir=flag_values["data_dir"].value,
            dataset=flag_values["dataset"].value,
            keep_recorded=flag_values["keep_recorded"].value)


if __name__ == "__main__":
  _FLAGS = _define_flags()
  flags.mark_flags_as_required(["out"])
  app.run(lambda argv: main(argv, _FLAGS))
