"""Tests for locca_jax.optim against a float64 NumPy re-derivation and arithmetic."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from locca_jax import optim

# 64x48: both dims >= 32, factored. 40x16: second-largest dim < 32, not factored.
SHAPES = {
    "img/Dense_0/kernel": (64, 48),
    "img/Dense_0/bias": (48,),
    "img/LayerNorm_0/scale": (48,),
    "txt/Dense_0/kernel": (40, 16),
    "txt/Embed_0/embedding": (30, 8),
}


def _nest(flat):
  """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _flat(tree):
  return dict(zip(optim.param_paths(tree), jax.tree.leaves(tree)))


def _config(**overrides):
  c = ml_collections.ConfigDict(dict(
      lr=0.03, wd=0.1, grad_clip_norm=2.0, total_steps=9,
      schedule=dict(warmup_steps=2, decay_type="cosine"),
      optax=dict(dtype_momentum="float32", clipping_threshold=None),
      lr_mults=(("txt/.*", 0.5),),
  ))
  c.update(overrides)
  return c


def _params_and_grads(steps, seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  # Per-step gradient scales chosen so global-norm clipping (at 2.0) fires on
  # some steps and not on others, far from the threshold either way.
  scales = [0.02, 1.0, 0.01, 3.0, 0.05, 0.5, 0.02][:steps]
  grads = [{k: (s * rng.normal(size=v.shape)).astype(np.float32)
            for k, v in params.items()} for s in scales]
  return params, grads


def _reference_updates(config, params, grads):
  """The chain written from its formula in float64 NumPy (no optax)."""
  ox = dict(config.optax)
  block_clip = ox.get("clipping_threshold")
  beta1, cap = ox.get("momentum", 0.9), ox.get("beta2_cap", 0.999)
  decay_rate, eps = ox.get("decay_rate", 0.8), 1e-30
  sched = config.schedule
  warm, total = sched["warmup_steps"], config.total_steps

  def schedule(t):
    if t < warm:
      return t / warm
    return 0.5 * (1 + math.cos(math.pi * min(t - warm, total - warm) / (total - warm)))

  p = {k: v.astype(np.float64) for k, v in params.items()}
  row, col, v, m = {}, {}, {}, {k: np.zeros_like(x) for k, x in p.items()}
  for k, x in p.items():
    if x.ndim == 2 and min(x.shape) >= 32:
      row[k], col[k] = np.zeros(x.shape[1]), np.zeros(x.shape[0])
    else:
      v[k] = np.zeros_like(x)
  lr_mult = {k: 0.5 if k.startswith("txt/") else 1.0 for k in p}
  wd_mult = {k: 1.0 if k.endswith("/kernel") else 0.0 for k in p}

  all_updates = []
  for t, g in enumerate(grads):
    g = {k: x.astype(np.float64) for k, x in g.items()}
    norm = math.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    if norm >= config.grad_clip_norm:
      g = {k: x * config.grad_clip_norm / norm for k, x in g.items()}
    b2 = min(cap, 1 - (t + 1) ** -decay_rate)
    updates = {}
    for k, gk in g.items():
      g2 = gk ** 2 + eps
      if k in row:
        # v_hat[i, j] = col[i] * row[j] / mean(v) is the rank-1 estimate of v.
        row[k] = b2 * row[k] + (1 - b2) * g2.mean(axis=0)
        col[k] = b2 * col[k] + (1 - b2) * g2.mean(axis=1)
        v_hat = np.outer(col[k], row[k]) / row[k].mean()
      else:
        v[k] = b2 * v[k] + (1 - b2) * g2
        v_hat = v[k]
      u = gk / np.sqrt(v_hat)
      if block_clip is not None:
        u = u / max(1.0, np.sqrt(np.mean(u ** 2)) / block_clip)
      m[k] = beta1 * m[k] + (1 - beta1) * u
      updates[k] = -schedule(t) * (config.lr * lr_mult[k] * m[k]
                                   + config.wd * wd_mult[k] * p[k])
      p[k] = p[k] + updates[k]
    all_updates.append(updates)
  return all_updates


def _run(config, params, grads, jit=False):
  """Applies `optim.make` for len(grads) steps; returns flat updates per step."""
  params = _nest({k: jnp.asarray(v) for k, v in params.items()})
  tx, _ = optim.make(config, params)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  out = []
  for g in grads:
    u, state = update(_nest({k: jnp.asarray(v) for k, v in g.items()}),
                      state, params)
    params = optax.apply_updates(params, u)
    out.append({k: np.asarray(x, np.float64) for k, x in _flat(u).items()})
  return out, params, state


@pytest.mark.parametrize("optax_kw", [
    {},
    # beta2_cap=0.6 binds from step 2 on (1 - 3^-0.8 = 0.585, 1 - 4^-0.8 = 0.67).
    dict(clipping_threshold=0.7, beta2_cap=0.6, momentum=0.8, decay_rate=0.7),
])
def test_updates_match_float64_reference(optax_kw):
  config = _config()
  config.optax.update(optax_kw)
  params, grads = _params_and_grads(steps=7)
  got, _, _ = _run(config, params, grads, jit=True)
  want = _reference_updates(config, params, grads)
  for t, (g, w) in enumerate(zip(got, want)):
    for k in SHAPES:
      # atol covers float32 cancellation where lr * m and wd * param nearly cancel.
      np.testing.assert_allclose(g[k], w[k], rtol=1e-5,
                                 atol=1e-6 * np.abs(w[k]).max() + 1e-12,
                                 err_msg=f"step {t} {k}")
  # The run must have exercised the interesting regimes.
  assert any(np.abs(w["img/Dense_0/kernel"]).max() > 1e-3 for w in want)


def test_bf16_momentum_is_close_to_float64_reference():
  config = _config()
  config.optax.dtype_momentum = "bfloat16"
  params, grads = _params_and_grads(steps=6)
  got, _, state = _run(config, params, grads)
  want = _reference_updates(config, params, grads)
  for t, (g, w) in enumerate(zip(got, want)):
    for k in SHAPES:
      scale = np.abs(w[k]).max()
      np.testing.assert_allclose(g[k], w[k], rtol=2e-2, atol=1e-2 * scale,
                                 err_msg=f"step {t} {k}")
  ema_dtypes = {x.dtype for x in jax.tree.leaves(state) if x.ndim == 2}
  assert jnp.dtype(jnp.bfloat16) in ema_dtypes


def test_factored_second_moment_of_1024_square_kernel_is_two_vectors():
  tx = optim.scale_by_adafactor(momentum=None)
  state = jax.eval_shape(tx.init, {"kernel": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)})
  sizes = [math.prod(x.shape) for x in jax.tree.leaves(state)]
  assert sum(s for s in sizes if s > 1) == 2 * 1024
  assert sum(s for s in sizes if s <= 1) <= 4  # step counter and placeholders


def test_small_or_thin_arrays_are_not_factored():
  tx = optim.scale_by_adafactor(momentum=None)
  for shape in [(8, 6), (1024, 31), (48,)]:
    state = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct(shape, jnp.float32)})
    assert max(math.prod(x.shape) for x in jax.tree.leaves(state)) == math.prod(shape)


def test_frozen_params_do_not_move_and_hold_no_state():
  config = _config(frozen=("txt/.*",), lr_mults=())
  params, grads = _params_and_grads(steps=5)
  _, new_params, state = _run(config, params, grads)
  new_flat = _flat(new_params)
  for k in ("txt/Dense_0/kernel", "txt/Embed_0/embedding"):
    np.testing.assert_array_equal(new_flat[k], params[k])
  assert not np.allclose(new_flat["img/Dense_0/kernel"], params["img/Dense_0/kernel"])
  frozen_shapes = {SHAPES["txt/Dense_0/kernel"], SHAPES["txt/Embed_0/embedding"]}
  state_shapes = {x.shape for x in jax.tree.leaves(state)}
  assert not frozen_shapes & state_shapes
  masked = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  assert any(isinstance(x, optax.MaskedNode) for x in masked)
  mask = _flat(optim.frozen_mask(config, _nest(params)))
  assert mask == {k: k.startswith("txt/") for k in SHAPES}


def test_frozen_gradients_do_not_enter_the_global_norm():
  config = _config(frozen=("txt/.*",), lr_mults=())
  params, grads = _params_and_grads(steps=4)
  huge = [dict(g, **{"txt/Dense_0/kernel": 1e6 * g["txt/Dense_0/kernel"]}) for g in grads]
  a, _, _ = _run(config, params, grads)
  b, _, _ = _run(config, params, huge)
  for ua, ub in zip(a, b):
    np.testing.assert_array_equal(ua["img/Dense_0/kernel"], ub["img/Dense_0/kernel"])


def test_lr_mult_scales_the_step_of_matching_params_only():
  config = _config(wd=0.0, grad_clip_norm=None, lr_mults=(("b/.*", 0.25),))
  rng = np.random.default_rng(1)
  w = rng.normal(size=(64, 48)).astype(np.float32)
  params = {"a/kernel": w, "b/kernel": w}
  grads = [{"a/kernel": g, "b/kernel": g}
           for g in rng.normal(size=(4, 64, 48)).astype(np.float32)]
  got, _, _ = _run(config, params, grads)
  for u in got[1:]:
    assert np.abs(u["a/kernel"]).max() > 0
    np.testing.assert_allclose(u["b/kernel"], 0.25 * u["a/kernel"], rtol=1e-6)


def test_weight_decay_is_scheduled_and_touches_kernels_only():
  config = _config(grad_clip_norm=None, lr_mults=())
  params, _ = _params_and_grads(steps=1)
  zeros = [{k: np.zeros_like(v) for k, v in params.items()}] * 4
  got, _, _ = _run(config, params, zeros)
  _, schedule_fn = optim.make(config, _nest(params))
  p = {k: v.astype(np.float64) for k, v in params.items()}
  for t, u in enumerate(got):
    for k in SHAPES:
      if k.endswith("/kernel"):
        # -schedule * wd * param, not multiplied by lr.
        want = -float(schedule_fn(t)) * config.wd * p[k]
      else:
        want = np.zeros_like(p[k])
      np.testing.assert_allclose(u[k], want, rtol=1e-6, atol=1e-12,
                                 err_msg=f"step {t} {k}")
      p[k] = p[k] + u[k]
  assert np.abs(got[3]["img/Dense_0/kernel"]).max() > 0


def test_default_weight_decay_reaches_the_attention_kernels_and_nothing_else():
  shapes = {"img/layer_0/attn/query_kernel": (8, 2, 4), "img/layer_0/attn/out_kernel": (2, 4, 8),
            "img/layer_0/attn/query_bias": (2, 4), "img/embedding/kernel": (2, 2, 3, 8),
            "img/pos_embedding": (1, 4, 8), "txt/embedding/embedding": (30, 8),
            "txt/mask_embedding": (8,), "txt/ln_self/scale": (8,)}
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
  zeros = [{k: np.zeros_like(v) for k, v in params.items()}] * 3
  got, _, _ = _run(_config(grad_clip_norm=None, lr_mults=()), params, zeros)
  decayed = {k for k, u in got[2].items() if np.abs(u).max() > 0}
  assert decayed == {"img/layer_0/attn/query_kernel", "img/layer_0/attn/out_kernel",
                     "img/embedding/kernel"}


@pytest.mark.parametrize("decay_type, extra, expected", [
    # warmup 10 of total 110: s = step - 10 runs over n = 100 decay steps.
    ("cosine", {}, {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.5 * (1 + math.cos(math.pi / 4)),
                    60: 0.5, 110: 0.0, 500: 0.0}),
    ("linear", {"linear_end": 0.1}, {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1,
                                     500: 0.1}),
    ("rsqrt", {"timescale": 100}, {0: 0.0, 5: 0.5, 10: 1.0, 110: math.sqrt(0.5),
                                   310: 0.5}),
])
def test_schedule_values(decay_type, extra, expected):
  config = _config(total_steps=110, schedule=dict(warmup_steps=10, decay_type=decay_type, **extra))
  _, schedule_fn = optim.make(config, _nest({k: np.zeros(s) for k, s in SHAPES.items()}))
  for step, want in expected.items():
    assert float(schedule_fn(step)) == pytest.approx(want, abs=1e-6), step
    assert float(jax.jit(schedule_fn)(step)) == pytest.approx(want, abs=1e-6), step


def test_unknown_decay_type_is_named_in_the_error():
  with pytest.raises(ValueError, match="stair"):
    optim.make(_config(schedule=dict(warmup_steps=1, decay_type="stair")),
               _nest({k: np.zeros(s) for k, s in SHAPES.items()}))


@pytest.mark.parametrize("field, value", [
    ("frozen", ("img/Dense_0/kernel", "vision/.*")),
    ("lr_mults", (("img/.*", 2.0), ("encoder/.*", 0.5))),
    ("wd_mults", ((".*/kernel", 1.0), (".*/wieght", 0.5))),
])
def test_regex_matching_nothing_raises(field, value):
  bad = value[-1] if isinstance(value[-1], str) else value[-1][0]
  with pytest.raises(ValueError, match=f"config.{field}.*{bad}"):
    optim.make(_config(**{field: value}), _nest({k: np.zeros(s) for k, s in SHAPES.items()}))


def test_boxed_params_give_the_same_paths_and_optimizer():
  class Model(nn.Module):

    @nn.compact
    def __call__(self, x):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      return nn.Dense(48, kernel_init=init, name="Dense_0")(x)

  boxed = jax.eval_shape(Model().init, jax.random.key(0), jnp.ones((1, 64)))
  assert isinstance(boxed["params"]["Dense_0"]["kernel"], nn.LogicallyPartitioned)
  assert optim.param_paths(boxed) == ["params/Dense_0/bias", "params/Dense_0/kernel"]
  tx, _ = optim.make(_config(lr_mults=(("params/Dense_0/.*", 2.0),)), boxed)
  params = nn.unbox(Model().init(jax.random.key(0), jnp.ones((1, 64))))
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(params, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
