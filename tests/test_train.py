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


@pytest.mark.slow
def test_transfer_trains_a_fresh_decoder_on_the_frozen_pretrained_encoder(shapes_data_dir,
                                                                          tmp_path):
  from configs.transfer import refcoco  # pylint: disable=g-import-not-at-top
  pretrain = tiny_config(shapes_data_dir)
  pretrain.total_steps = 3
  pretrained = train.train_and_evaluate(pretrain, str(tmp_path / "pretrain"))

  # The shipped transfer recipe, shrunk to the tiny model and data.
  config = refcoco.get_config("runlocal")
  tiny = tiny_config(shapes_data_dir)
  config.input.data, config.input.image_size = tiny.input.data, tiny.input.image_size
  config.input.batch_size, config.input.shuffle_buffer = 8, 64
  config.model.encoder, config.model.decoder = tiny.model.encoder, tiny.model.decoder
  config.total_steps, config.schedule.warmup_steps, config.evals = 3, 1, {}
  config.init_from.workdir = str(tmp_path / "pretrain")
  transferred = train.train_and_evaluate(config, str(tmp_path / "transfer"))

  for a, b in zip(jax.tree_util.tree_leaves(pretrained["params"]["img"]),
                  jax.tree_util.tree_leaves(transferred["params"]["img"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # loaded, then frozen
  # The decoder is not the pretrained one (fresh init, then trained on ARef).
  assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(pretrained["params"]["txt"]),
      jax.tree_util.tree_leaves(transferred["params"]["txt"])))
  with open(tmp_path / "transfer" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert {"train/loss", "train/loss_aref"} <= set(records[-1])



_FAILING_EVAL_CONFIG = """
import sys
sys.path.insert(0, {repo!r})
from tests.conftest import tiny_config

def get_config():
  config = tiny_config({data_dir!r})
  config.total_steps, config.ckpt_every = 3, 3
  # A split the dataset does not have: found only when the evaluator runs, at step 3.
  config.evals = dict(rec=dict(type="rec", data=dict(name="locca_shapes/tiny", split="dev",
                                                     data_dir={data_dir!r}),
                               batch_size=8, max_len=8))
  return config
"""


@pytest.mark.slow
def test_a_failing_evaluator_leaves_the_checkpoint_of_its_step_complete(shapes_data_dir,
                                                                        tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from locca_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from tests.conftest import REPO  # pylint: disable=g-import-not-at-top
  config_file = tmp_path / "failing_eval.py"
  config_file.write_text(_FAILING_EVAL_CONFIG.format(repo=REPO, data_dir=shapes_data_dir))
  workdir = tmp_path / "workdir"
  result = subprocess.run(
      [sys.executable, "-m", "locca_jax.train", f"--config={config_file}",
       f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode != 0 and "split='dev'" in result.stderr, result.stderr[-3000:]
  # The asynchronous save of step 3, started just before the evaluator ran, was finished
  # before the process exited.
  step, params = checkpoint.load_params(str(workdir / "checkpoints"))
  assert step == 3 and jax.tree_util.tree_leaves(params)


class _Step:
  """A stand-in for a dispatched step's output: records when it is waited on."""

  def __init__(self, name, log):
    self.name, self.log = name, log

  def block_until_ready(self):
    self.log.append(self.name)
    return self


@pytest.mark.parametrize("limit", [0, 1, 2])
def test_steps_in_flight_waits_for_the_step_limit_pushes_back_in_order(limit):
  waited = []
  in_flight = train.StepsInFlight(limit)
  for s in range(5):
    in_flight.push(_Step(s, waited))
    # After pushing step s, every step older than s - limit + 1 has been waited on, in order.
    assert waited == list(range(max(0, s - limit + 1)))
