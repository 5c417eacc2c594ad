r"""Runs the evaluators of `config.evals` on a checkpoint (or, from the trainer, on live params).

  python -m locca_jax.evaluate --config=configs/locca_b16.py:runlocal --workdir=workdirs/locca

restores the params of the latest checkpoint in WORKDIR/checkpoints (or `--step`), runs every
evaluator of `config.evals` (or those named by `--evals=rec,caption`), writes each one's
per-example predictions to WORKDIR/eval/<name>_step<N>.jsonl and prints ONE JSON object on
stdout (everything else goes to stderr):

  {"step": 1200, "caption/cider": 1.52, "caption/bleu4": 0.41, ..., "rec/acc@0.5": 0.83, ...}

Evaluators are declared in the config, one entry per name:

  c.evals.rec = dict(type="rec", data=dict(name="locca_shapes/base", split="validation"),
                     batch_size=64, max_examples=None, log_steps=500)

Fields: `type` (rec | caption | gcap | perplexity | zeroshot | dense | probe, see
`locca_jax.evaluators`), `data` (one data spec of `locca_jax.data.sources`: a TFDS name +
split, whose data_dir defaults to config.input.data's, or a jsonl / coco_json / vg file),
`batch_size` (global; default config.input.batch_size; a multiple of the mesh's data x fsdp
devices), `max_examples` (None: the whole split; N: its first N records), `log_steps` (the
trainer runs it every that many steps, see `evals_due`), `max_len` (decoding evaluators:
decoded tokens; prompt width = config.input.seq_len - max_len); type-specific fields are in
each evaluator's module docstring. Metric keys are `<name>/<metric>`.
"""
import contextlib
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from locca_jax import checkpoint
from locca_jax import sharding
from locca_jax import train_step
from locca_jax.data import input_pipeline
from locca_jax.evaluators import caption
from locca_jax.evaluators import common
from locca_jax.evaluators import dense
from locca_jax.evaluators import gcap
from locca_jax.evaluators import perplexity
from locca_jax.evaluators import probe
from locca_jax.evaluators import rec
from locca_jax.evaluators import zeroshot
from locca_jax.models import locca

EVALUATORS = dict(rec=rec.evaluate, caption=caption.evaluate, gcap=gcap.evaluate,
                  perplexity=perplexity.evaluate, zeroshot=zeroshot.evaluate,
                  dense=dense.evaluate, probe=probe.evaluate)


def eval_names(config: ml_collections.ConfigDict, names=None) -> list[str]:
  """`names` (default: all of config.evals), checked against config.evals."""
  evals = config.get("evals") or {}
  names = list(evals.keys()) if names is None else list(names)
  for name in names:
    if name not in evals:
      raise ValueError(f"evaluator {name!r} is not in config.evals (has {sorted(evals)})")
    kind = evals[name].get("type")
    if kind not in EVALUATORS:
      raise ValueError(f"config.evals.{name}.type={kind!r}: expected one of "
                       f"{sorted(EVALUATORS)}")
  return names


def check_evals(config: ml_collections.ConfigDict, tokenizer, mesh) -> list[str]:
  """Checks every evaluator's config without reading data (for the trainer to call at start,
  so that a bad eval config fails before training, not at the first eval). Returns the names.
  """
  names = eval_names(config)
  for name in names:
    cfg = config.evals[name]
    common.eval_data(config, name, cfg)
    common.max_examples(name, cfg)
    common.local_batch_size(config, name, cfg, mesh)
    if cfg.type not in ("perplexity", "zeroshot", "probe"):
      common.decode_budget(config, name, cfg, 1)
    if cfg.type == "rec":
      rec.box_constraint(config, tokenizer, name, cfg)
    if cfg.type == "zeroshot":
      opts = zeroshot.options(name, cfg)
      if opts["class_names"] is not None:
        zeroshot.class_rows(tokenizer, config,
                            [opts["template"].format(n) for n in opts["class_names"]],
                            f"config.evals.{name}")
    if cfg.type == "dense":
      dense.options(config, name, cfg)
  return names


def evals_due(config: ml_collections.ConfigDict, step: int, total_steps: int) -> list[str]:
  """Names to run after train step `step`: every `log_steps` steps, and at the last step."""
  due = []
  for name in eval_names(config):
    every = config.evals[name].get("log_steps")
    if step == total_steps or (every and step % int(every) == 0):
      due.append(name)
  return due


def write_predictions(workdir: str, name: str, step: int, records: list[dict]) -> str:
  """WORKDIR/eval/<name>_step<N>.jsonl, one record per example (process 0 only)."""
  path = os.path.join(workdir, "eval", f"{name}_step{step}.jsonl")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
  return path


def run_evals(config: ml_collections.ConfigDict, params, model, tokenizer, mesh, step: int,
              workdir: str | None, *, names=None) -> dict[str, float]:
  """Runs evaluators (default: all of config.evals) -> {"<name>/<metric>": value}.

  A collective: every process must call it with the same arguments. Predictions go to
  WORKDIR/eval/<name>_step<step>.jsonl (skipped when `workdir` is None).
  """
  ctx = common.Context(config=config, model=model, params=params, tokenizer=tokenizer,
                       mesh=mesh)
  out = {}
  for name in eval_names(config, names):
    cfg = config.evals[name]
    start = time.monotonic()
    metrics, records = EVALUATORS[cfg.type](ctx, name, cfg)
    where = ""
    if workdir is not None and records:
      where = " -> " + write_predictions(workdir, name, step, records)
    logging.info("eval %s (%s) at step %d in %.1fs: %s%s", name, cfg.type, step,
                 time.monotonic() - start, metrics, where)
    out.update({f"{name}/{k}": v for k, v in metrics.items()})
  return out


def restore_params(config: ml_collections.ConfigDict, model, mesh, workdir: str,
                   step: int | None = None):
  """(step, params) of WORKDIR/checkpoints/<step> (default: latest), sharded over `mesh`."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"--workdir={workdir}: no checkpoints/ directory (train first: "
                     "python -m locca_jax.train --config=... --workdir=...)")
  spec = train_step.make_state_spec(model, config, mesh)
  ckpt = checkpoint.Checkpointer(directory, every=config.ckpt_every, keep=config.keep_ckpts,
                                 async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"--workdir={workdir}: no checkpoint in {directory}")
    state = ckpt.restore(step, spec.abstract)
  finally:
    ckpt.close()
  return step, state["params"]


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        step: int | None = None, names=None) -> dict:
  """Restores a checkpoint and runs the evaluators -> {"step": N, "<name>/<metric>": ...}."""
  names = eval_names(config, names)
  if not names:
    raise ValueError("config.evals is empty: nothing to evaluate (see configs/locca_b16.py)")
  mesh = sharding.make_mesh(config.mesh)
  tokenizer = input_pipeline.make_tokenizer(config.input.tokenizer)
  model = locca.make_model(config.model, tokenizer.vocab_size, config.input.seq_len)
  step, params = restore_params(config, model, mesh, workdir, step)
  metrics = run_evals(config, params, model, tokenizer, mesh, step, workdir, names=names)
  return {"step": int(step), **metrics}


def _define_flags():
  """The command's flags; defined only when run as a program, so that the trainer (which
  defines its own --config / --workdir) can import this module."""
  return dict(
      config=config_flags.DEFINE_config_file("config", None, "Training config file.",
                                             lock_config=True),
      workdir=flags.DEFINE_string("workdir", None, "Workdir with checkpoints/ (as for train)."),
      step=flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: latest)."),
      evals=flags.DEFINE_list("evals", None, "Names in config.evals to run (default: all)."))


def main(argv, flag_values):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # TensorFlow only feeds the input pipeline: keep it off the accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON object only
    result = evaluate_checkpoint(flag_values["config"].value, flag_values["workdir"].value,
                                 step=flag_values["step"].value,
                                 names=flag_values["evals"].value)
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  _FLAGS = _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(lambda argv: main(argv, _FLAGS))
