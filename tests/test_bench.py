"""The benchmark: its analytic FLOP count against XLA, and a tiny CPU run of the CLI."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from locca_jax import flops
from locca_jax.models import decoder as decoder_lib
from locca_jax.models import locca

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("decoder_width", [None, 256])
def test_analytic_flops_match_xla_cost_analysis(decoder_width):
  # Widths large enough that matmuls dominate XLA's count (which also counts elementwise ops).
  cfg = ml_collections.ConfigDict(dict(
      encoder=dict(variant="S/16", depth=2),
      decoder=dict(num_layers=2, width=decoder_width, num_heads=4)))
  image_size, rows, seq_len = 64, 3, 32
  model = locca.make_model(cfg, 1000, seq_len)
  image = jnp.zeros((2, image_size, image_size, 3))
  tokens, mask = decoder_lib.decoder_inputs(jnp.ones((2, rows, seq_len), jnp.int32),
                                            jnp.zeros((2, rows), bool))
  params = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, tokens,
                                                      mask)["params"]))
  loss = lambda p: model.apply({"params": p}, image, tokens, mask).sum()  # pylint: disable=unnecessary-lambda-assignment
  xla_fwd = jax.jit(loss).lower(params).compile().cost_analysis()["flops"] / 2
  xla_train = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()["flops"] / 2
  ours_fwd = flops.forward_flops_per_image(model, image_size, rows, seq_len)
  ours_train = flops.train_flops_per_image(model, image_size, rows, seq_len)
  assert abs(ours_fwd / xla_fwd - 1) < 0.03, (ours_fwd, xla_fwd)
  # The backward pass skips the gradient w.r.t. the input pixels: XLA is a little below 3x.
  assert abs(ours_train / xla_train - 1) < 0.05, (ours_train, xla_train)


@pytest.mark.slow
def test_bench_cli_runs_at_tiny_size_on_cpu():
  overrides = ["--config.input.image_size=32", "--config.model.encoder.width=32",
               "--config.model.encoder.depth=1", "--config.model.encoder.mlp_dim=64",
               "--config.model.encoder.num_heads=2", "--config.model.decoder.num_layers=1",
               "--config.input.seq_len=16"]
  result = subprocess.run(
      [sys.executable, "-m", "locca_jax.bench", "--config=configs/locca_b16.py:runlocal",
       "--batch=8", "--vocab_size=64", "--steps=2", "--repeats=2", "--decode_batch=2",
       "--decode_len=8", *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-4000:]
  stats = json.loads(result.stdout.strip().splitlines()[-1])
  assert stats["batch"] == 8 and stats["rows_per_image"] == 3
  assert stats["encoder"] == "Ti/8 width=32 depth=1" and stats["decoder_layers"] == 1
  assert stats["step_ms"] > 0 and stats["img_per_sec"] > 0
  assert stats["img_per_sec"] == pytest.approx(8 / (stats["step_ms"] / 1e3), rel=1e-6)
  assert stats["decode_cached_tok_per_sec"] > 0 and stats["decode_rerun_tok_per_sec"] > 0
  assert stats["mfu"] is None  # no published peak for a CPU
