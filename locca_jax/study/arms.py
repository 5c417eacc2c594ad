"""What the study runs: its arms, its scales, and each stage's config.

An arm is a named, pure transformation of configs/locca_b16.py:runlocal (ARMS); a scale fixes
what every arm shares: data, model, steps, evaluation sizes (SCALES, parse_scale). Together
with a seed they give each stage's config: pretraining (pretrain_config) and the frozen-encoder
REC transfer (transfer_config), plus the linear probe's evaluator config (probe_eval).
Each arm x seed runs in ROOT/<arm>/seed<k>/{pretrain,transfer} (run_workdirs, stage_configs);
with_dataset puts a scale on another locca_shapes config.
"""
import dataclasses
import math
import os
from typing import Callable

import ml_collections

from configs import locca_b16
from configs.transfer import refcoco
from locca_jax.data import locca_shapes
from locca_jax.evaluators import probe

BASE_CONFIG = "configs/locca_b16.py:runlocal"
TRANSFER_CONFIG = "configs/transfer/refcoco.py:runlocal"


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
# docs/experiments/README.md, 10). 35-80 min per arm x seed on 2 CPU cores (the whole study:
# about 16.5 h, resumable).
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


def base_config() -> ml_collections.ConfigDict:
  """BASE_CONFIG, the config every arm transforms."""
  return locca_b16.get_config("runlocal")


def transfer_base_config() -> ml_collections.ConfigDict:
  """TRANSFER_CONFIG, every arm's transfer."""
  return refcoco.get_config("runlocal")


def scaled_base(scale: Scale, data_dir: str | None = None) -> ml_collections.ConfigDict:
  """BASE_CONFIG on the scale's data and model, with its pretraining steps: what the arms
  transform."""
  return _scaled(base_config(), scale, data_dir, steps=scale.pretrain_steps,
                 warmup=scale.pretrain_warmup, ckpt_every=scale.ckpt_every)


def pretrain_config(arm: str, scale: Scale, seed: int,
                    data_dir: str | None = None) -> ml_collections.ConfigDict:
  """The arm's pretraining config: ARMS[arm] of the scaled base config, test evals."""
  c = ARMS[arm].transform(scaled_base(scale, data_dir))
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
  c = _scaled(transfer_base_config(), scale, data_dir, steps=scale.transfer_steps,
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


def run_workdirs(root: str, arm: str, seed: int) -> dict[str, str]:
  """{stage: workdir} of one arm x seed under the study's root."""
  run = os.path.join(root, arm, f"seed{seed}")
  return dict(pretrain=os.path.join(run, "pretrain"), transfer=os.path.join(run, "transfer"))


def stage_configs(arm: str, sc: Scale, seed: int, root: str, data_dir) -> dict:
  """{stage: config} of one arm x seed (the transfer reads the pretrain workdir's encoder)."""
  return dict(pretrain=pretrain_config(arm, sc, seed, data_dir),
              transfer=transfer_config(sc, seed, run_workdirs(root, arm, seed)["pretrain"],
                                       data_dir))


def with_dataset(sc: Scale, dataset: str | None) -> Scale:
  """The scale on another locca_shapes builder config (None or "": the scale's own)."""
  if not dataset:
    return sc
  names = list(locca_shapes.LoccaShapes.builder_configs)
  if dataset not in names:
    raise ValueError(f"--dataset={dataset!r}: expected a locca_shapes config, one of {names}")
  return dataclasses.replace(sc, dataset=dataset)
