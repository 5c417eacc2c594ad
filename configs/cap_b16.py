"""Cap-B/16 baseline: plain captioning pretraining, same encoder/decoder/recipe as LocCa.

Run:   python -m locca_jax.train --config=configs/cap_b16.py --workdir=W
Tiny:  --config=configs/cap_b16.py:runlocal
"""
from configs import locca_b16


def get_config(arg=None):
  c = locca_b16.get_config(arg)
  c.input.tasks = ("cap",)
  c.model.parallel_fraction = 0.0
  # Without ARef/GCap training, box evaluators measure nothing; caption quality remains.
  del c.evals.rec, c.evals.gcap
  return c
