"""Metric arithmetic shared by the evaluators: box accuracy / IoU and caption scores.

Pure Python / numpy on already decoded predictions (no model, no TensorFlow import), so the
numbers can be checked by hand.

Boxes (referring expression comprehension):
  A prediction that does not parse as a box (`Tokenizer.parse_box` returns None) has IoU 0.
  `acc@0.5` is the fraction of examples with IoU(pred, gt) >= 0.5 (the usual RefCOCO
  convention: a box at exactly 0.5 counts as correct); `miou` the mean IoU over all examples
  (unparsable ones included, as 0); `unparsable` the fraction of unparsable predictions.

Captions:
  Texts are normalized by `caption_tokens`: lowercase, then every maximal run of letters and
  digits is one token; whitespace and punctuation only separate tokens and are dropped
  ("A red-circle, left." -> "a red circle left"; "it's" -> "it s"). This stands in for the
  Java PTBTokenizer of the COCO toolkit (which also lowercases and drops punctuation, but keeps
  clitics such as "'s" as tokens). The normalized strings are scored with pycocoevalcap's
  `Cider` (CIDEr-D, sigma 6, n-grams up to 4, document frequencies from the evaluated
  references), `Bleu(4)` (corpus BLEU-4, "closest" reference length) and `Rouge` (ROUGE-L,
  beta 1.2). CIDEr is a corpus metric: it depends on every reference of the evaluated set.
"""
import re
from typing import Sequence

import numpy as np

from locca_jax import boxes as boxlib

IOU_THRESHOLD = 0.5
_WORD_RE = re.compile(r"[^\W_]+")  # letters and digits (any script), not "_"


# ------------------------------------------------------------------------------ boxes
def parse_boxes(tokenizer, continuations: Sequence[Sequence[int]]) -> list[np.ndarray | None]:
  """Decoded continuations (ids after the `aref: <refexp> :` prompt) -> yxyx boxes or None."""
  return [tokenizer.parse_box(np.asarray(ids, np.int64)) for ids in continuations]


def box_ious(pred_boxes: Sequence[np.ndarray | None], gt_boxes) -> np.ndarray:
  """IoU [N] of each prediction with its ground truth; 0 where the prediction is None."""
  gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
  if len(pred_boxes) != len(gt):
    raise ValueError(f"{len(pred_boxes)} predicted boxes for {len(gt)} ground-truth boxes")
  ious = np.zeros(len(gt), np.float64)
  for i, (pred, box) in enumerate(zip(pred_boxes, gt)):
    if pred is not None:
      ious[i] = float(boxlib.iou(np.asarray(pred, np.float64), box, pairwise=False))
  return ious


def box_scores(pred_boxes: Sequence[np.ndarray | None], gt_boxes,
               threshold: float = IOU_THRESHOLD) -> dict[str, float]:
  """{"acc@0.5": IoU >= threshold rate, "miou": mean IoU, "unparsable": rate of None}."""
  ious = box_ious(pred_boxes, gt_boxes)
  n = max(len(ious), 1)
  return {f"acc@{threshold:g}": float(np.sum(ious >= threshold)) / n,
          "miou": float(np.sum(ious)) / n,
          "unparsable": float(sum(p is None for p in pred_boxes)) / n}


# ------------------------------------------------------------------------------ captions
def caption_tokens(text: str) -> str:
  """The normalized, space-joined tokens of `text` (see the module docstring)."""
  return " ".join(_WORD_RE.findall(text.lower()))


def caption_scores(predictions: Sequence[str],
                   references: Sequence[Sequence[str]]) -> tuple[dict[str, float],
                                                                   np.ndarray]:
  """Corpus CIDEr, BLEU-4, ROUGE-L of raw predictions against raw references.

  Args:
    predictions: one text per example.
    references: per example, one or more reference texts (empty ones are dropped; an example
      must keep at least one).
  Returns:
    ({"cider", "bleu4", "rouge_l"}, per-example CIDEr [N]). All 0 for an empty set.
  """
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=g-import-not-at-top
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
  if not predictions:
    return dict(cider=0.0, bleu4=0.0, rouge_l=0.0), np.zeros(0)
  res, gts = {}, {}
  for i, (pred, refs) in enumerate(zip(predictions, references)):
    refs = [caption_tokens(r) for r in refs]
    refs = [r for r in refs if r]
    if not refs:
      raise ValueError(f"example {i}: no non-empty reference caption (prediction {pred!r})")
    res[i], gts[i] = [caption_tokens(pred)], refs
  cider, per_example = Cider().compute_score(gts, res)
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  rouge, _ = Rouge().compute_score(gts, res)
  return (dict(cider=float(cider), bleu4=float(bleu[3]), rouge_l=float(rouge)),
          np.asarray(per_example, np.float64))
