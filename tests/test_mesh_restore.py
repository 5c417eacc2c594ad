"""Sharded state across meshes: FSDP shards optimizer state, checkpoints restore onto another
mesh, and the compiled per-device memory matches the shard arithmetic (8 simulated devices)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = textwrap.dedent("""
    import json, math, os, sys
    sys.modules["tensorflow"] = None  # the state path needs no TensorFlow
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    from locca_jax import checkpoint, memory, sharding, train_step
    from locca_jax.models import locca
    from tests.conftest import tiny_config

    config = tiny_config(data_dir=None)
    config.optax.dtype_momentum = "float32"
    config.optax.eps = 1e-4  # continuous in g: compares sharding, not reduction-order signs
    rng = np.random.default_rng(0)
    batch = dict(
        image=rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
        text=rng.integers(1, 96, (8, 3, 48)).astype(np.int32),
        mask_loss=(rng.uniform(size=(8, 3, 48)) > 0.3).astype(np.float32))
    model = locca.make_model(config.model, 96, config.input.seq_len)

    def setup(axes):
      mesh = sharding.make_mesh(axes)
      spec = train_step.make_state_spec(model, config, mesh)
      step = train_step.make_train_step(model, spec.tx, config, mesh, spec.shardings)
      return mesh, spec, step

    def flat(tree):
      return np.concatenate([np.asarray(x, np.float32).ravel()
                             for x in jax.tree_util.tree_leaves(tree)])

    out = {{}}
    # 1. Train 2 steps on a data-parallel mesh and save.
    mesh_a, spec_a, step_a = setup((("data", 8), ("fsdp", 1), ("tensor", 1)))
    state = spec_a.init()
    for _ in range(2):
      state, _ = step_a(state, sharding.global_batch(batch, mesh_a))
    ckpt = checkpoint.Checkpointer(os.path.join({out!r}, "ckpt"), every=1, keep=1,
                                   async_save=False)
    ckpt.save(2, state, force=True)
    ckpt.wait()
    saved_params, saved_opt = flat(state["params"]), flat(state["opt_state"])
    _, m_a = step_a(state, sharding.global_batch(batch, mesh_a))
    out["loss3_data"] = float(m_a["train/loss"])

    # 2. Restore onto FSDP x tensor: same values, the target shardings, same next step.
    mesh_b, spec_b, step_b = setup((("data", 2), ("fsdp", 2), ("tensor", 2)))
    restored = ckpt.restore(2, spec_b.abstract)
    ckpt.close()
    out["params_equal"] = bool(np.array_equal(flat(restored["params"]), saved_params))
    out["opt_equal"] = bool(np.array_equal(flat(restored["opt_state"]), saved_opt))
    out["shardings_match"] = all(
        x.sharding.is_equivalent_to(s.sharding, x.ndim) for x, s in zip(
            jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(spec_b.abstract)))
    out["step"] = int(restored["step"])
    _, m_b = step_b(restored, sharding.global_batch(batch, mesh_b))
    out["loss3_restored"] = float(m_b["train/loss"])

    # 3. FSDP shards the optimizer state like the params (momentum and unfactored moments).
    mesh_f, spec_f, _ = setup((("data", 1), ("fsdp", 8), ("tensor", 1)))
    opt_leaves = jax.tree_util.tree_leaves(spec_f.abstract["opt_state"])
    big = [x for x in opt_leaves if math.prod(x.shape) >= 32 * 32]
    out["big_opt_leaves"] = len(big)
    out["big_opt_leaves_sharded"] = sum(not x.sharding.is_fully_replicated for x in big)

    # 4. XLA's compiled argument size = the state shards + the batch shard, per device.
    for name, mesh, spec in (("data", mesh_a, spec_a), ("fsdp", mesh_f, spec_f)):
      m = memory.train_step_memory(config, mesh, 8, 96)
      out[name] = dict(m, state_replicated=sum(
          math.prod(x.shape) * x.dtype.itemsize
          for x in jax.tree_util.tree_leaves(spec.abstract)))
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_state_restores_onto_another_mesh_and_fsdp_shards_optimizer_state(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _WORKER.format(repo=REPO, out=str(tmp_path))],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])

  assert out["step"] == 2
  assert out["params_equal"] and out["opt_equal"] and out["shardings_match"]
  np.testing.assert_allclose(out["loss3_restored"], out["loss3_data"], rtol=1e-5)
  assert out["big_opt_leaves"] > 0
  assert out["big_opt_leaves_sharded"] == out["big_opt_leaves"]

  # Per device: the batch is split 8 ways on both meshes; 32 px uint8 images, 3 rows x 48
  # tokens (int32 text, float32 mask_loss).
  batch_shard = (8 // 8) * (32 * 32 * 3 * 1 + 2 * 3 * 48 * 4)
  data, fsdp = out["data"], out["fsdp"]
  assert data["state"] == data["state_replicated"]  # data parallel: every device holds it all
  # XLA may drop a few unused bytes of an argument (e.g. a scalar), hence the 1% slack.
  np.testing.assert_allclose(data["arguments"], data["state"] + batch_shard, rtol=0.01)
  np.testing.assert_allclose(fsdp["arguments"], fsdp["state"] + batch_shard, rtol=0.01)
  # FSDP holds about 1/8 of the state (small replicated leaves: biases, norms, factors).
  assert fsdp["state"] < data["state"] / 4
  # The donated state is updated in place.
  np.testing.assert_allclose(data["aliased"], data["state"], rtol=0.01)
