"""Evaluators: one module per `config.evals.NAME.type`, run by `locca_jax.evaluate`.

  rec         referring expression comprehension: Acc@0.5, mean IoU (rec.py)
  caption     captioning: CIDEr, BLEU-4, ROUGE-L (caption.py)
  gcap        grounded captioning of a given box: CIDEr, BLEU-4, ROUGE-L (gcap.py)
  perplexity  teacher-forced NLL / perplexity per task (perplexity.py)

Each exposes `evaluate(ctx: common.Context, name, cfg) -> (metrics, records)`; the shared
input / decoding / multi-host plumbing is in common.py and the metric arithmetic in scoring.py.
"""
