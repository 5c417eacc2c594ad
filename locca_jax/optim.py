"""The big_vision Adafactor variant and the optimizer / schedule factory (optax).

`make(config, params)` returns `(tx, schedule_fn)`. `tx` is one
`optax.GradientTransformation` over the plain (unboxed) parameter tree; per
trainable parameter it computes, in this order:

  1. g  = clip_by_global_norm(grad, config.grad_clip_norm)   # over trainable params only
  2. u  = scale_by_adafactor(g, **config.optax)              # factored RMS, [block clip], EMA momentum
  3. u  = config.lr * lr_mult * u
  4. u  = u + config.wd * wd_mult * param                    # decoupled weight decay
  5. u  = -schedule_fn(step) * u                             # both terms follow the schedule

i.e. `update = -schedule(t) * (lr * lr_mult * adafactor(clip(g)) + wd * wd_mult * param)`,
which is big_vision's `optax.make`: weight decay follows the schedule but is not
multiplied by the learning rate (so `wd` is a per-step fraction, e.g. 1e-4).
Frozen parameters (`config.frozen`) get exactly zero updates and carry no
optimizer state at all (`optax.MaskedNode` in their place).

Parameters are addressed by "/"-joined paths such as
`img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel`; every regex in
`frozen`, `lr_mults` and `wd_mults` must match a *whole* path (`re.fullmatch`,
as in big_vision), and the first matching rule wins.
"""

from collections.abc import Callable, Sequence
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any
Schedule = Callable[[jax.typing.ArrayLike], jax.Array]

_SCHEDULE_KEYS = ("warmup_steps", "decay_type", "linear_end", "timescale")
_DECAY_TYPES = ("cosine", "linear", "rsqrt")
_TRAIN, _FROZEN = "train", "frozen"


def scale_by_adafactor(min_dim_size_to_factor: int = 32,
                       decay_rate: float = 0.8,
                       decay_offset: int = 0,
                       beta2_cap: float = 0.999,
                       clipping_threshold: float | None = None,
                       momentum: float | None = 0.9,
                       dtype_momentum: Any = jnp.bfloat16,
                       eps: float = 1e-30) -> optax.GradientTransformation:
  """The "Scaling ViT" (Zhai et al. 2021) Adafactor variant, as in big_vision.

  Second moment: `optax.scale_by_factored_rms`, i.e. `v = b2_t v + (1 - b2_t)
  (g^2 + eps)`, stored factored (row and column means) for arrays whose two
  largest dimensions are both >= `min_dim_size_to_factor` and in full
  otherwise; the update is `g / sqrt(v_hat)`. Unlike the original Adafactor,
  `b2_t = min(beta2_cap, 1 - (t + 1)^-decay_rate)` is capped so the second
  moment keeps tracking the gradient late in training; and instead of
  update-clipping + relative step sizes there is an optional per-array RMS clip
  and first-moment momentum (EMA without debiasing, kept in `dtype_momentum`
  to halve its memory).

  Args:
    min_dim_size_to_factor: factor only if both largest dims are at least this.
    decay_rate: exponent of the second-moment decay schedule.
    decay_offset: step at which the decay schedule restarts (fine-tuning).
    beta2_cap: upper bound of the second-moment decay `b2_t`.
    clipping_threshold: if set, clip each array's update to this RMS.
    momentum: EMA decay of the first moment; None (or 0) disables it.
    dtype_momentum: dtype (or its name, e.g. "bfloat16") of the EMA state.
    eps: added to the squared gradient before averaging.

  Returns:
    An `optax.GradientTransformation` (needs `params` in `update`).
  """

  def decay_rate_fn(step, exponent):
    t = jnp.asarray(step, jnp.float32) + 1.0
    return jnp.minimum(beta2_cap, 1.0 - t ** (-exponent))

  txs = [optax.scale_by_factored_rms(
      factored=True,
      decay_rate=decay_rate,
      step_offset=decay_offset,
      min_dim_size_to_factor=min_dim_size_to_factor,
      epsilon=eps,
      decay_rate_fn=decay_rate_fn)]
  if clipping_threshold is not None:
    txs.append(optax.clip_by_block_rms(clipping_threshold))
  # An EMA with decay 0 is the identity; skipping it saves a params-sized state.
  if momentum:
    txs.append(optax.ema(momentum, debias=False,
                         accumulator_dtype=jnp.dtype(dtype_momentum)))
  return optax.chain(*txs)


def _key_str(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _paths_and_treedef(tree: PyTree) -> tuple[list[str], Any]:
  """"/"-joined leaf paths of the unboxed tree, in `jax.tree.leaves` order."""
  tree = nn.meta.unbox(tree)
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = ["/".join(_key_str(k) for k in path) for path, _ in path_leaves]
  return paths, treedef


def param_paths(tree: PyTree) -> list[str]:
  """Returns the "/"-joined path of every leaf, in `jax.tree.leaves` order.

  `nn.LogicallyPartitioned` (or any flax `AxisMetadata`) boxes are unboxed
  first, so a boxed and an unboxed tree give the same paths.
  """
  return _paths_and_treedef(tree)[0]


def _match_first(paths: Sequence[str], rules: Sequence[tuple[str, Any]],
                 what: str) -> list[int | None]:
  """For each path, the index of the first rule whose regex fullmatches it.

  Raises a ValueError naming any regex that matches no path: such a rule is
  almost always a typo, and silently ignoring it would train the wrong thing.
  """
  compiled = []
  for pattern, _ in rules:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"{what}: invalid regex {pattern!r}: {e}") from e
  chosen = [next((i for i, rx in enumerate(compiled) if rx.fullmatch(path)),
                 None) for path in paths]
  for (pattern, _), rx in zip(rules, compiled):
    if not any(rx.fullmatch(p) for p in paths):
      examples = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
      raise ValueError(
          f"{what}: regex {pattern!r} matches no parameter (patterns must "
          f"match a whole '/'-joined path, e.g. one of: {examples})")
  return chosen


def _rules(value, what: str) -> list[tuple[str, float]]:
  """Normalizes a ((regex, multiplier), ...) config value."""
  rules = []
  for rule in value or ():
    if isinstance(rule, str) or len(rule) != 2:
      raise ValueError(f"{what}: expected (regex, multiplier) pairs, got {rule!r}")
    rules.append((str(rule[0]), float(rule[1])))
  return rules


def _as_dict(value) -> dict[str, Any]:
  if value is None:
    return {}
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  return dict(value)


def _frozen_flags(config: ml_collections.ConfigDict,
                  paths: Sequence[str]) -> list[bool]:
  frozen = config.get("frozen", ()) or ()
  if isinstance(frozen, str):
    frozen = (frozen,)
  chosen = _match_first(paths, [(p, True) for p in frozen], "config.frozen")
  return [c is not None for c in chosen]


def frozen_mask(config: ml_collections.ConfigDict, params: PyTree) -> PyTree:
  """Boolean tree (structure of the unboxed `params`): True where frozen."""
  paths, treedef = _paths_and_treedef(params)
  return jax.tree.unflatten(treedef, _frozen_flags(config, paths))


def make_schedule(config: ml_collections.ConfigDict) -> Schedule:
  """Returns `step -> multiplier in [0, 1]` from `config.schedule`.

  Linear warmup from 0 at step 0 to 1 at `warmup_steps`, then (with
  `s = step - warmup_steps`, `n = total_steps - warmup_steps`):
    cosine: 0.5 * (1 + cos(pi * min(s, n) / n)), reaching 0 at total_steps;
    linear: from 1 down to `linear_end` at total_steps, constant after;
    rsqrt:  sqrt(timescale / (timescale + s)), `timescale` default 10_000
            (does not depend on total_steps; no cooldown).
  """
  sched = _as_dict(config.get("schedule"))
  unknown = sorted(set(sched) - set(_SCHEDULE_KEYS))
  if unknown:
    raise ValueError(f"config.schedule: unknown keys {unknown} "
                     f"(expected some of {list(_SCHEDULE_KEYS)})")
  decay_type = sched.get("decay_type", "cosine")
  if decay_type not in _DECAY_TYPES:
    raise ValueError(f"config.schedule.decay_type={decay_type!r} is unknown "
                     f"(expected one of {list(_DECAY_TYPES)})")
  warmup = int(sched.get("warmup_steps", 0))
  total = int(config.total_steps)
  if warmup < 0 or (decay_type != "rsqrt" and total <= warmup):
    raise ValueError(f"config.schedule.warmup_steps={warmup} must be >= 0 and "
                     f"< config.total_steps={total}")

  if decay_type == "cosine":
    decay = optax.cosine_decay_schedule(1.0, decay_steps=total - warmup)
  elif decay_type == "linear":
    decay = optax.linear_schedule(1.0, float(sched.get("linear_end", 0.0)),
                                  transition_steps=total - warmup)
  else:  # rsqrt: optax has no schedule for it.
    timescale = float(sched.get("timescale", 10_000))
    decay = lambda s: jnp.sqrt(timescale / (timescale + jnp.maximum(s, 0)))

  if warmup == 0:
    fn = decay
  else:
    fn = optax.join_schedules(
        [optax.linear_schedule(0.0, 1.0, transition_steps=warmup), decay],
        boundaries=[warmup])
  return lambda step: jnp.asarray(fn(step), jnp.float32)


# Weight decay on kernels only: Dense / Conv `kernel` and the attention's `{query,key,value,
# out}_kernel`; not biases, LayerNorm scales, embeddings or position embeddings.
DEFAULT_WD_MULTS = ((r".*(/|_)kernel", 1.0),)


def make(config: ml_collections.ConfigDict,
         params: PyTree) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds the optimizer and its schedule from the training config.

  Args:
    config: the training config; reads `lr`, `wd`, `grad_clip_norm`,
      `schedule`, `total_steps`, `optax` (kwargs of `scale_by_adafactor`) and,
      optionally, `wd_mults` (default `DEFAULT_WD_MULTS`: every kernel, incl. the
      attention's `query_kernel` ... `out_kernel`), `lr_mults`
      and `frozen` (see the module docstring).
    params: the parameter tree, or its `jax.eval_shape`; may hold
      `nn.LogicallyPartitioned` boxes. Only its structure and paths are used.

  Returns:
    `(tx, schedule_fn)`: `tx` works on the *unboxed* parameter tree
    (`nn.unbox(params)`); `schedule_fn(step)` is the multiplier in [0, 1], so
    the learning rate at `step` is `config.lr * schedule_fn(step)`.
  """
  paths, treedef = _paths_and_treedef(params)
  frozen = _frozen_flags(config, paths)
  schedule_fn = make_schedule(config)

  def masks(rules, what):
    """One boolean tree per rule: where it is the first match (and trainable)."""
    chosen = _match_first(paths, rules, what)
    return [jax.tree.unflatten(treedef, [c == i and not f
                                         for c, f in zip(chosen, frozen)])
            for i in range(len(rules))]

  txs = []
  if config.get("grad_clip_norm"):
    # Inside the "train" branch, so frozen gradients do not enter the norm.
    txs.append(optax.clip_by_global_norm(float(config.grad_clip_norm)))

  kw = _as_dict(config.get("optax"))
  if "dtype_momentum" in kw:
    kw["dtype_momentum"] = jnp.dtype(kw["dtype_momentum"])
  txs.append(scale_by_adafactor(**kw))

  txs.append(optax.scale(float(config.lr)))
  lr_rules = _rules(config.get("lr_mults", ()), "config.lr_mults")
  for pattern, mult in lr_rules:
    if mult <= 0:
      raise ValueError(f"config.lr_mults: multiplier {mult} for {pattern!r} "
                       "must be > 0 (use config.frozen to freeze parameters)")
  for (_, mult), mask in zip(lr_rules, masks(lr_rules, "config.lr_mults")):
    txs.append(optax.masked(optax.scale(mult), mask))

  wd = float(config.get("wd", 0.0) or 0.0)
  if wd:
    wd_rules = _rules(config.get("wd_mults", DEFAULT_WD_MULTS), "config.wd_mults")
    for (_, mult), mask in zip(wd_rules, masks(wd_rules, "config.wd_mults")):
      if mult:
        txs.append(optax.add_decayed_weights(wd * mult, mask))

  # One schedule for both terms: wd follows the schedule, not the lr.
  txs.append(optax.scale_by_schedule(schedule_fn))
  txs.append(optax.scale(-1.0))

  labels = jax.tree.unflatten(treedef, [_FROZEN if f else _TRAIN
                                        for f in frozen])
  tx = optax.multi_transform(
      {_TRAIN: optax.chain(*txs), _FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule_fn
