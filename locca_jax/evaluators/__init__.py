"""Evaluators: one module per `config.evals.NAME.type`, run by `locca_jax.evaluate`.

  rec         referring expression comprehension: Acc@0.5, mean IoU (rec.py)
  caption     captioning: CIDEr, BLEU-4, ROUGE-L (caption.py)
  gcap        grounded captioning of a given box: CIDEr, BLEU-4, ROUGE-L (gcap.py)
  perplexity  teacher-forced NLL / perplexity per task (perplexity.py)
  zeroshot    classification by each class caption's likelihood: top-1 / top-5 (zeroshot.py)
  dense       dense captioning, free `aref:` pairs: COCO mAP, exact caption match (dense.py)
  probe       linear (ridge) probe of frozen mean-pooled encoder features: mAP (probe.py)

Each exposes `evaluate(ctx: common.Context, name, cfg) -> (metrics, records)`; the shared
input / decoding / multi-host plumbing is in common.py, teacher-forced row likelihoods in
likelihood.py and the metric arithmetic in scoring.py.
"""
