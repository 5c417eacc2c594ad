"""CapPa-B/16 baseline (Tschannen et al. 2023): captioning where 75% of the examples are
trained with parallel prediction (all decoder inputs masked, bidirectional attention).

Run:   python -m locca_jax.train --config=configs/cappa_b16.py --workdir=W
Tiny:  --config=configs/cappa_b16.py:runlocal
"""
from configs import locca_b16


def get_config(arg=None):
  c = locca_b16.get_config(arg)
  c.input.tasks = ("cap",)
  c.model.parallel_fraction = 0.75
  # Without ARef/GCap training, box evaluators measure nothing; caption quality remains.
  del c.evals.rec, c.evals.gcap
  return c
