"""Train step: decoder inputs, loss, mesh equivalence, TensorFlow-free import."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import pytest

from locca_jax import train_step
from locca_jax.models import decoder as decoder_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_teacher_forcing_inputs_are_targets_shifted_right_with_causal_mask():
  text = np.array([[[5, 6, 7, 1]]])  # [B=1, T=1, L=4]
  tokens, mask = decoder_lib.decoder_inputs(jnp.asarray(text), jnp.zeros((1, 1), bool))
  np.testing.assert_array_equal(tokens, [[[decoder_lib.BOS_ID, 5, 6, 7]]])
  expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(mask[0, 0], expected)


def test_parallel_prediction_rows_see_only_mask_tokens_and_attend_both_ways():
  text = np.arange(1, 2 * 3 * 5 + 1).reshape(2, 3, 5)
  parallel = np.array([[True, False, False], [False, False, False]])
  tokens, mask = decoder_lib.decoder_inputs(jnp.asarray(text), jnp.asarray(parallel))
  assert (np.asarray(tokens[0, 0]) == decoder_lib.MASK_ID).all()
  assert np.asarray(mask[0, 0]).all()  # bidirectional
  # Other rows untouched: shifted targets, causal.
  np.testing.assert_array_equal(tokens[1, 2], np.concatenate([[0], text[1, 2, :-1]]))
  np.testing.assert_array_equal(mask[0, 1], np.tril(np.ones((5, 5), bool)))


def test_parallel_fraction_selects_only_cap_rows_at_the_requested_rate():
  parallel = train_step.sample_parallel(jax.random.PRNGKey(0), 20_000, ("aref", "cap", "gcap"),
                                        0.25)
  parallel = np.asarray(parallel)
  assert not parallel[:, 0].any() and not parallel[:, 2].any()
  assert abs(parallel[:, 1].mean() - 0.25) < 0.02


def test_loss_is_masked_token_mean_against_numpy_float64():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 7))
  text = rng.integers(0, 7, size=(2, 3, 4))
  mask = (rng.uniform(size=(2, 3, 4)) > 0.4).astype(np.float64)
  mask[:, 2] = 0  # a task with no trained tokens this batch
  loss, metrics = train_step.compute_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(text),
                                          jnp.asarray(mask, jnp.float32), ("cap", "aref", "gcap"))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, text[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, (nll * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["train/loss_aref"],
                             (nll * mask)[:, 1].sum() / mask[:, 1].sum(), rtol=1e-5)
  assert float(metrics["train/loss_gcap"]) == 0.0



def test_chunked_cross_entropy_equals_optax_on_whole_logits_with_the_same_gradients():
  rng = np.random.default_rng(0)
  b, t, l, f, v = 2, 3, 8, 5, 11
  features = jnp.asarray(rng.normal(size=(b, t, l, f)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(f, v)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
  text = jnp.asarray(rng.integers(0, v, size=(b, t, l)))
  weights = jnp.asarray(rng.uniform(size=(b, t, l)), jnp.float32)

  def reference(h, k, c):  # whole logits through optax
    logits = jnp.einsum("btlf,fv->btlv", h, k) + c
    return (optax.softmax_cross_entropy_with_integer_labels(logits, text) * weights).sum()

  def chunked(h, k, c):
    return (train_step.chunked_token_nll(h, k, c, text, 4) * weights).sum()

  ref_value, ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(features, kernel, bias)
  value, grads = jax.value_and_grad(chunked, argnums=(0, 1, 2))(features, kernel, bias)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="xent_chunk=3"):
    train_step.chunked_token_nll(features, kernel, bias, text, 3)


def test_train_loss_with_chunked_cross_entropy_equals_whole_logits():
  from locca_jax.models import locca  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir=None)
  model = locca.make_model(config.model, 50, config.input.seq_len)
  rng = np.random.default_rng(0)
  batch = dict(image=jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32),
               text=jnp.asarray(rng.integers(1, 50, (2, 3, 48)), jnp.int32),
               mask_loss=jnp.asarray(rng.uniform(size=(2, 3, 48)) > 0.3, jnp.float32))
  params = model.init(jax.random.PRNGKey(0), *train_step.dummy_inputs(32, 3, 48))["params"]
  params = nn.unbox(params)
  # A nonzero head, so the logits (zero-initialized) depend on the features.
  params["txt"]["head"]["kernel"] = jnp.asarray(
      rng.normal(size=params["txt"]["head"]["kernel"].shape), jnp.float32)
  results = {}
  for chunk in (0, 12):
    config.xent_chunk = chunk
    loss_fn = train_step.make_loss_fn(model, config)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, jax.random.PRNGKey(1))
    results[chunk] = (loss, metrics, grads)
  np.testing.assert_allclose(results[12][0], results[0][0], rtol=1e-5)
  np.testing.assert_allclose(results[12][1]["train/loss_gcap"], results[0][1]["train/loss_gcap"],
                             rtol=1e-5)
  for got, want in zip(jax.tree_util.tree_leaves(results[12][2]),
                       jax.tree_util.tree_leaves(results[0][2])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

# Runs in a fresh interpreter: 8 simulated CPU devices, and TensorFlow made unimportable so
# the model / optimizer / sharding / train-step path is proven TF-free at the same time.
_MESH_WORKER = textwrap.dedent("""
    import json, os, sys
    sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    from locca_jax import sharding, train_step, optim, checkpoint
    from locca_jax.models import locca
    from tests.conftest import tiny_config

    config = tiny_config(data_dir=None)
    config.model.parallel_fraction = 0.5
    config.xent_chunk = 12  # the piecewise cross-entropy, sharded like the logits would be
    config.optax.dtype_momentum = "float32"
    # Adafactor's first steps are ~sign(g): with eps=1e-30 a gradient of 1e-12 on one mesh
    # and -1e-12 on another (reduction order) gives opposite full-size updates. A larger eps
    # makes the update continuous in g, so the comparison tests the sharding, not that.
    config.optax.eps = 1e-4
    rng = np.random.default_rng(0)
    batch = dict(
        image=rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
        text=rng.integers(1, 96, (8, 3, 48)).astype(np.int32),
        mask_loss=(rng.uniform(size=(8, 3, 48)) > 0.3).astype(np.float32))
    out = {{}}
    for name, axes, devices in [("single", (("data", 1),), jax.devices()[:1]),
                                ("8x1x1", (("data", 8), ("fsdp", 1), ("tensor", 1)), None),
                                ("2x4x1", (("data", 2), ("fsdp", 4), ("tensor", 1)), None),
                                ("2x2x2", (("data", 2), ("fsdp", 2), ("tensor", 2)), None)]:
      mesh = sharding.make_mesh(axes, devices)
      model = locca.make_model(config.model, 96, config.input.seq_len)
      spec = train_step.make_state_spec(model, config, mesh)
      state = spec.init()
      step = train_step.make_train_step(model, spec.tx, config, mesh, spec.shardings)
      losses = []
      for _ in range(3):
        state, metrics = step(state, sharding.global_batch(batch, mesh))
        losses.append(float(metrics["train/loss"]))
      leaves = [np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(state["params"])]
      opt = [np.asarray(x, np.float32).ravel() for x in jax.tree_util.tree_leaves(state["opt_state"])]
      sharded = sum(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
                    for x in jax.tree_util.tree_leaves(state["params"]))
      np.savez(os.path.join({out!r}, name + ".npz"), losses=np.array(losses),
               params=np.concatenate(leaves), opt=np.concatenate(opt))
      out[name] = dict(sharded_params=int(sharded))
    assert "tensorflow" not in {{k for k, v in sys.modules.items() if v is not None}}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_train_step_on_8_devices_matches_one_device_for_each_mesh(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  code = _MESH_WORKER.format(repo=REPO, out=str(tmp_path))
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  info = json.loads(result.stdout.strip().splitlines()[-1])
  assert info["single"]["sharded_params"] == 0
  assert info["2x4x1"]["sharded_params"] > 0 and info["2x2x2"]["sharded_params"] > 0
  ref = np.load(tmp_path / "single.npz")
  assert np.isfinite(ref["losses"]).all() and ref["losses"][-1] < ref["losses"][0]
  for name in ("8x1x1", "2x4x1", "2x2x2"):
    got = np.load(tmp_path / f"{name}.npz")
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(got["params"], ref["params"], rtol=1e-4, atol=1e-5,
                               err_msg=name)
    np.testing.assert_allclose(got["opt"], ref["opt"], rtol=1e-3, atol=1e-6, err_msg=name)


_NO_TF_WORKER = textwrap.dedent("""
    import sys
    sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError
    sys.path.insert(0, {repo!r})
    import numpy as np
    from locca_jax import checkpoint, optim, sharding, train_step
    from locca_jax.models import locca
    from tests.conftest import tiny_config

    config = tiny_config(data_dir=None)
    mesh = sharding.make_mesh(config.mesh)
    model = locca.make_model(config.model, 50, config.input.seq_len)
    spec = train_step.make_state_spec(model, config, mesh)
    step = train_step.make_train_step(model, spec.tx, config, mesh, spec.shardings)
    rng = np.random.default_rng(0)
    batch = dict(image=np.zeros((8, 32, 32, 3), np.float32),
                 text=rng.integers(1, 50, (8, 3, 48)).astype(np.int32),
                 mask_loss=np.ones((8, 3, 48), np.float32))
    _, metrics = step(spec.init(), sharding.global_batch(batch, mesh))
    assert np.isfinite(float(metrics["train/loss"]))
    loaded = {{k for k, v in sys.modules.items() if v is not None}}
    assert not {{m for m in loaded if m.split(".")[0] in ("tensorflow", "tensorflow_text",
                                                          "tensorflow_datasets")}}
    print("ok")
""")


def test_model_optimizer_sharding_and_train_step_run_without_tensorflow():
  code = _NO_TF_WORKER.format(repo=REPO)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:]
