"""Frozen-encoder referring-expression transfer (the LocCa paper's Table 2 protocol).

Loads the encoder (`img/...`) of a pretrained workdir (LocCa, Cap or CapPa), freezes it, trains
a fresh decoder on ARef rows (`aref: <refexp> : <box>`), and reports `rec` (Acc@0.5).

  python -m locca_jax.train --config=configs/transfer/refcoco.py:runlocal \\
      --config.init_from.workdir=workdirs/locca_runlocal --workdir=workdirs/rec_transfer

Runs offline on locca_shapes by default; for RefCOCO set --config.input.data.name=ref_coco/refcoco_unc
(and the same for config.evals.rec.data), TFDS `ref_coco` feature layout.
"""
from configs import locca_b16


def get_config(arg=None):
  c = locca_b16.get_config(arg)  # the pretraining model's encoder / input settings
  runlocal = arg == "runlocal"
  c.init_from = dict(workdir="workdirs/locca_runlocal" if runlocal else "workdirs/locca_b16",
                     step=None, params="img/.*")
  c.frozen = ("img/.*",)  # frozen: no gradient step, no optimizer state
  c.input.tasks = ("aref",)
  c.input.loss = dict(aref=dict(prefix=False, caption=False, box=True))
  c.model.parallel_fraction = 0.0
  c.total_steps = 300 if runlocal else 20_000
  c.schedule = dict(warmup_steps=30 if runlocal else 1_000, decay_type="cosine")
  c.lr = 1e-3
  c.ckpt_every = 300 if runlocal else 2_000
  # The decoder learns ARef only: REC is the one evaluator that measures it.
  rec = c.evals.rec
  rec.log_steps = c.total_steps
  c.evals = dict(rec=rec)
  return c
