"""`dense` evaluator: COCO mAP with exact caption match on hand-built predictions (AP values by
hand), parsing of free `aref:` continuations as ARef rows are written, and an end-to-end run."""
import jax
import numpy as np
import pytest

from locca_jax import tokenizer as tokenizer_lib
from locca_jax.evaluators import dense

EOS = tokenizer_lib.EOS_ID
SIZE = 100  # image size: boxes below are normalized yxyx, COCO sees them in 100-px images


def _image(index, regions, predictions):
  return dict(index=index, regions=[dict(text=t, box=b) for t, b in regions],
              predictions=[dict(text=t, box=b, score=s) for t, b, s in predictions])


A, B = [0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]


def test_perfect_predictions_score_ap_1_and_wrong_texts_ap_0():
  gt = [("the red circle", A), ("the blue square", B)]
  perfect = [_image(0, gt, [("The red circle.", A, -1.0), ("the blue square", B, -2.0)])]
  metrics, _ = dense.score(perfect, SIZE)
  # 1.0 up to rounding (COCOeval's precision is tp / (tp + fp + machine epsilon)).
  for key in ("map", "ap50", "ap75"):
    assert metrics[key] == pytest.approx(1.0, abs=1e-12), key
  assert metrics["predictions_per_image"] == 2 and metrics["num_regions"] == 2
  # Exact boxes, texts that are not the region's: a caption match is exact, so nothing counts.
  swapped = [_image(0, gt, [("the blue square", A, -1.0), ("the red circle", B, -2.0)])]
  assert dense.score(swapped, SIZE)[0]["map"] == 0.0
  unknown = [_image(0, gt, [("a red circle", A, -1.0), ("the green star", B, -2.0)])]
  metrics, _ = dense.score(unknown, SIZE)
  assert metrics["map"] == 0.0 and metrics["unknown_text"] == 1.0


def test_ap_over_iou_thresholds_and_recall_by_hand():
  # "circle": exact box. "square": box shifted by 0.05 in x and y: IoU = 0.35^2 / (2 * 0.4^2 -
  # 0.35^2) = 0.1225 / 0.1975 = 0.620, a hit at the thresholds 0.50, 0.55, 0.60 (3 of 10).
  gt = [("circle", A), ("square", B)]
  shifted = [0.55, 0.55, 0.95, 0.95]
  metrics, _ = dense.score([_image(0, gt, [("circle", A, -1.0), ("square", shifted, -1.0)])],
                           SIZE)
  assert metrics["ap50"] == pytest.approx(1.0)
  assert metrics["map"] == pytest.approx((1.0 + 0.3) / 2)
  assert metrics["ap75"] == pytest.approx(0.5)
  # One of two "circle" regions found, with precision 1: AP = 51 / 101 (COCO's 101 recall
  # points 0, 0.01, ..., 1; precision 1 up to recall 0.5, none after).
  two = [_image(0, [("circle", A)], [("circle", A, -1.0)]), _image(1, [("circle", B)], [])]
  assert dense.score(two, SIZE)[0]["map"] == pytest.approx(51 / 101)


def test_detections_are_ranked_by_score():
  # Two "circle" predictions for one region: the better-scored one wrong (a false positive
  # ranked first): precision 1/2 at recall 1 -> AP 0.5; ranked second it costs nothing.
  gt = [("circle", A)]
  wrong_first = [_image(0, gt, [("circle", B, -1.0), ("circle", A, -3.0)])]
  right_first = [_image(0, gt, [("circle", B, -3.0), ("circle", A, -1.0)])]
  assert dense.score(wrong_first, SIZE)[0]["map"] == pytest.approx(0.5)
  assert dense.score(right_first, SIZE)[0]["map"] == pytest.approx(1.0)


def test_no_ground_truth_region_is_an_error():
  with pytest.raises(ValueError, match="no ground-truth region"):
    dense.score([_image(0, [(" ... ", A)], [("circle", A, 0.0)])], SIZE)


def test_continuations_parse_as_aref_rows_and_duplicates_are_kept_once():
  tok = tokenizer_lib.Tokenizer(tokenizer_lib.SHAPES_SP_MODEL, bins=500)
  sep = tok.encode(":")
  box = np.array([0.2, 0.1, 0.6, 0.3])  # yxyx
  row = tok.encode("the red circle") + sep + tok.encode_box(box) + [EOS]  # as data/tasks.py
  text, parsed = dense.parse_pair(tok, row + [0, 0], sep)
  assert text == "the red circle"
  assert np.abs(parsed - box).max() <= 0.5 / 500 + 1e-9
  assert dense.parse_pair(tok, tok.encode("the red circle") + [EOS], sep) is None  # no ":"
  assert dense.parse_pair(tok, sep + tok.encode_box(box) + [EOS], sep) is None  # no caption
  assert dense.parse_pair(tok, tok.encode("the red circle : star") + [EOS], sep) is None
  flipped = tok.encode("the red circle") + sep + tok.encode("300 50 100 150") + [EOS]
  assert tok.parse_box(flipped[4:]) is not None
  assert dense.parse_pair(tok, flipped, sep) is None  # xmax < xmin: not a box
  # A box after eos does not count.
  assert dense.parse_pair(tok, tok.encode("the red circle") + sep + [EOS]
                          + tok.encode_box(box), sep) is None
  other = tok.encode("The red circle.") + sep + tok.encode_box(box) + [EOS]
  width = max(len(row), len(other))
  cont = np.array([ids + [0] * (width - len(ids)) for ids in (row, other, [EOS])])
  preds, unparsable = dense.predictions(tok, cont, np.array([-5.0, -2.0, -1.0]), sep)
  assert unparsable == 1
  assert len(preds) == 1 and preds[0]["score"] == -2.0  # same normalized text and box


def test_continuation_rows_weigh_the_tokens_up_to_the_first_eos():
  cont = np.array([[[7, 8, EOS, 0], [7, 8, 9, 10]]], np.int32)
  rows, weights = dense.continuation_rows([5, 6], cont, EOS)
  assert rows.tolist() == [[[5, 6, 7, 8, EOS, 0], [5, 6, 7, 8, 9, 10]]]
  assert weights.tolist() == [[[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]]


def test_dense_runs_end_to_end_and_reads_every_region_of_the_split(shapes_data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from locca_jax.data import locca_shapes  # pylint: disable=g-import-not-at-top
  from tests.test_zeroshot import _context  # pylint: disable=g-import-not-at-top
  ctx = _context(shapes_data_dir)
  cfg = dict(type="dense", data=dict(name="locca_shapes/tiny", split="validation"),
             batch_size=4, max_examples=6, max_len=12, num_samples=3)
  metrics, records = dense.evaluate(ctx, "dense", cfg)
  ds = locca_shapes.prepare("tiny", shapes_data_dir).as_dataset(split="validation[:6]",
                                                                 shuffle_files=False)
  split = list(tfds.as_numpy(ds))
  expected = [[r.decode() for r in ex["objects"]["refexp"]] for ex in split]
  assert [[g["text"] for g in r["regions"]] for r in records] == expected
  for r, ex in zip(records, split):  # squash resize: normalized boxes unchanged
    np.testing.assert_allclose([g["box"] for g in r["regions"]], ex["objects"]["bbox"],
                               atol=1e-6)
  assert metrics["num_examples"] == 6 and metrics["num_regions"] == sum(map(len, expected))
  assert all(r["samples"] == 3 for r in records)
  kept = sum(len(r["predictions"]) for r in records)
  assert metrics["predictions_per_image"] == kept / 6 <= 3
  assert metrics["unparsable"] == sum(r["unparsable"] for r in records) / 18
  assert 0 <= metrics["map"] <= metrics["ap50"] <= 1


def _writer_params(ctx, seq, head_scale=1.0):
  """Params of the tiny model under which, whatever the image and the tokens before, the most
  likely token at position l is seq[l]: everything zero (each decoder block adds 0 to the
  residual stream, the visual tokens are ignored) except the position embedding of position l,
  the unit vector e_l, and the head, which reads e_l (after the final LayerNorm) as seq[l]."""
  params = jax.tree_util.tree_map(np.zeros_like, ctx.params)
  txt = params["txt"]
  assert len(seq) <= txt["pos_embedding"].shape[1]
  txt["decoder_norm"]["scale"] = np.ones_like(txt["decoder_norm"]["scale"])
  positions = np.arange(len(seq))
  txt["pos_embedding"][positions, positions] = 1.0
  txt["head"]["kernel"][positions, seq] = head_scale
  return params


def test_a_model_that_writes_the_ground_truth_region_scores_ap_1_with_its_likelihood(
    shapes_data_dir):
  import dataclasses  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from locca_jax.data import locca_shapes  # pylint: disable=g-import-not-at-top
  from tests.test_zeroshot import _context  # pylint: disable=g-import-not-at-top
  ctx = _context(shapes_data_dir)
  tok, seq_len = ctx.tokenizer, ctx.config.input.seq_len
  (ex,) = tfds.as_numpy(locca_shapes.prepare("tiny", shapes_data_dir).as_dataset(
      split="validation[:1]", shuffle_files=False))
  refexp, box = ex["objects"]["refexp"][0].decode(), ex["objects"]["bbox"][0]
  prompt = tok.encode("aref:")
  seq = prompt + tok.encode(refexp) + tok.encode(":") + tok.encode_box(box) + [EOS]
  ctx = dataclasses.replace(ctx, params=_writer_params(ctx, seq))
  cfg = dict(type="dense", data=dict(name="locca_shapes/tiny", split="validation"),
             batch_size=4, max_examples=1, max_len=len(seq), num_samples=2, top_k=1)
  metrics, (record,) = dense.evaluate(ctx, "dense", cfg)
  (pred,) = record["predictions"]  # top_k=1: both samples write seq, kept once
  assert pred["text"] == refexp
  assert np.abs(np.asarray(pred["box"]) - box).max() <= 0.5 / tok.bins + 1e-6
  assert metrics["unparsable"] == 0 and metrics["predictions_per_image"] == 1
  # Bin centres within 1/1000 of the image of a box of >= 0.1: IoU > 0.95, a hit at every
  # threshold, and for this region's text the only detection: AP 1 for it; the image's other
  # region texts have ground truth but no detection: AP 0.
  texts = {t.decode() for t in ex["objects"]["refexp"]}
  assert metrics["map"] == pytest.approx(1 / len(texts), abs=1e-9)
  assert metrics["ap50"] == pytest.approx(1 / len(texts), abs=1e-9)
  # The score: log p of the continuation up to eos, from the full forward pass in float64.
  row = np.zeros(seq_len, np.int32)
  row[:len(seq)] = seq
  tokens = np.concatenate([[0], row[:-1]])[None, None]
  mask = np.tril(np.ones((seq_len, seq_len), bool))[None, None]
  image = np.zeros((1, 32, 32, 3), np.float32)  # ignored by this model
  logits = np.asarray(ctx.model.apply({"params": ctx.params}, image, tokens, mask),
                      np.float64)[0, 0]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  positions = np.arange(len(prompt), len(seq))
  expected = logp[positions, row[positions]].sum()
  assert -len(positions) * 3 < expected < -len(positions) * 0.5  # a real, non-degenerate score
  assert pred["score"] == pytest.approx(expected, rel=1e-5)
