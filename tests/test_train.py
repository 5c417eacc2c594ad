"""The trainer end to end on locca_shapes/tiny: resume equals an uninterrupted run."""
import json
import shutil

import jax
import numpy as np
import pytest

from locca_jax import train
from tests.conftest import tiny_config


def _losses_by_step(workdir):
  """Last logged loss per step (a resumed run re-logs the steps it redoes)."""
  losses = {}
  with open(workdir / "metrics.jsonl") as f:
    for line in f:
      record = json.loads(line)
      losses[record["step"]] = record["train/loss"]
  return losses


@pytest.mark.slow
def test_crashed_and_resumed_run_equals_uninterrupted_run(shapes_data_dir, tmp_path):
  config = tiny_config(shapes_data_dir)
  config.total_steps, config.ckpt_every = 7, 3
  full = train.train_and_evaluate(config, str(tmp_path / "full"))

  # A run that stops after 5 steps and whose newest checkpoint (step 5) is lost, as if the
  # process died between checkpoints: the rerun restarts from step 3 and redoes 4 and 5.
  crashed = tmp_path / "crashed"
  train.train_and_evaluate(config, str(crashed), steps_this_run=5)
  assert sorted(p.name for p in (crashed / "checkpoints").iterdir() if p.name.isdigit()) == [
      "3", "5"]
  shutil.rmtree(crashed / "checkpoints" / "5")
  resumed = train.train_and_evaluate(config, str(crashed))

  full_losses, resumed_losses = _losses_by_step(tmp_path / "full"), _losses_by_step(crashed)
  assert sorted(full_losses) == sorted(resumed_losses) == list(range(1, 8))
  np.testing.assert_allclose([resumed_losses[s] for s in range(1, 8)],
                             [full_losses[s] for s in range(1, 8)], rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(full["params"]),
                  jax.tree_util.tree_leaves(resumed["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert int(resumed["step"]) == 7
  # The loss actually moves: the comparison is not between two constant runs.
  assert full_losses[7] < full_losses[1]
