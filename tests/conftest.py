"""Shared fixtures: a tiny training config on the `locca_shapes/tiny` dataset."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def tiny_config(data_dir: str, with_evals: bool = False):
  """The runlocal config shrunk to seconds per run: 32 px, 1+1 layers, width 32.

  `with_evals` keeps the runlocal evaluators (on locca_shapes/tiny validation); without, the
  trainer only trains (evaluators are tested in tests/test_evaluate.py).
  """
  from configs import locca_b16  # pylint: disable=g-import-not-at-top
  c = locca_b16.get_config("runlocal")
  c.input.data = dict(name="locca_shapes/tiny", split="train", data_dir=data_dir)
  c.input.image_size = 32
  c.input.batch_size = 8
  c.input.shuffle_buffer = 64
  c.model.encoder = dict(variant="mu/8", width=32, depth=1, mlp_dim=64, num_heads=2,
                         posemb="learn")
  c.model.decoder = dict(num_layers=1, width=None, mlp_dim=None, num_heads=None,
                         use_bias=True)
  c.total_steps = 6
  if with_evals:
    for name in c.evals:
      c.evals[name].data = dict(name="locca_shapes/tiny", split="validation",
                                data_dir=data_dir)
  else:
    c.evals = {}
  c.schedule = dict(warmup_steps=2, decay_type="cosine")
  c.log_every = 1
  c.ckpt_every = 3
  return c


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """locca_shapes/tiny prepared once per test session."""
  from locca_jax.data import locca_shapes  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  locca_shapes.prepare("tiny", data_dir)
  return data_dir
