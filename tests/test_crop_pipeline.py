"""The training crop in the input pipeline: targets are the regions the crop keeps, in the crop's
frame; evaluation never crops; the maps stay stateless.

Expected windows are recomputed from each example's seed with `preprocess.crop_window` (the
sampler); which regions stay and where their boxes go is numpy arithmetic written out here.
"""
import json

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework import op_def_registry

from locca_jax.data import input_pipeline
from locca_jax.data import preprocess

BINS = 500
H, W = 96, 128
# Three regions per image, pixels (x0, y0, x1, y1) as the JSONL format writes them.
REGIONS = {"the left square": (4, 10, 44, 50), "the right square": (84, 40, 124, 90),
           "the middle bar": (50, 0, 70, 96)}
CROP = dict(kind="inception", area=(0.3, 0.7), aspect=(3 / 4, 4 / 3), min_visible=0.5)


def _config(path, crop, tasks=("aref", "gcap")):
  return ml_collections.ConfigDict(dict(
      seed=3,
      input=dict(
          data=dict(source="jsonl", path=path), batch_size=8, image_size=32, resize="squash",
          seq_len=48, tasks=tasks, shuffle_buffer=0, crop=crop,
          tokenizer=dict(sp_model="locca_jax/assets/locca_shapes_sp.model", box_codec="text",
                         bins=BINS, box_order="xmin ymin xmax ymax"))))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("crop")
  # A gradient, so that a crop changes the (uint8) pixels the model gets.
  yy, xx = np.mgrid[:H, :W]
  image = np.repeat((yy + xx).astype(np.uint8)[..., None], 3, axis=-1)
  Image.fromarray(image).save(d / "a.jpg", format="JPEG")
  regions = [{"box": list(b), "text": t} for t, b in REGIONS.items()]
  with open(d / "train.jsonl", "w") as f:
    for i in range(8):
      f.write(json.dumps({"image": "a.jpg", "caption": "three shapes", "image_id": i,
                          "regions": regions}) + "\n")
  return str(d / "train.jsonl")


@pytest.fixture(scope="module")
def tok():
  return input_pipeline.make_tokenizer(_config(None, None).input.tokenizer)


def _split(row, task):
  body = row[len(task) + 1:].strip()
  left, _, right = body.partition(" : ")
  return (left, right) if task == "aref" else (right, left)


def test_aref_and_gcap_targets_are_regions_the_crop_keeps_in_the_crop_frame(data, tok):
  config = _config(data, CROP)
  opts = preprocess.crop_options(CROP)
  ds = input_pipeline.make_train_dataset(config, tok, process_index=0, process_count=1,
                                         extra_fields=("seed",))
  px = {t: np.array([y0, x0, y1, x1], np.float64)
        for t, (x0, y0, x1, y1) in REGIONS.items()}
  boxes = np.array(list(px.values())) / [H, W, H, W]
  cropped = dropped = 0
  for batch in ds.take(3).as_numpy_iterator():
    for text_rows, seed in zip(batch["text"], batch["seed"]):
      crop_seed = tf.random.experimental.stateless_fold_in(tf.constant(seed, tf.int64),
                                                           preprocess.CROP_SEED_SALT)
      begin, size = (t.numpy().astype(np.float64) for t in preprocess.crop_window(
          [H, W], tf.constant(boxes, tf.float32), crop_seed, opts))
      cropped += int(size.tolist() != [H, W])
      window = np.concatenate([begin, begin + size])
      kept = {}
      for t, b in px.items():
        inside = np.concatenate([np.maximum(b[:2], window[:2]), np.minimum(b[2:], window[2:])])
        area = np.prod(np.clip(inside[2:] - inside[:2], 0, None))
        if area > 0 and area >= 0.5 * np.prod(b[2:] - b[:2]):
          kept[t] = (inside - np.tile(begin, 2)) / np.tile(size, 2)
      dropped += len(REGIONS) - len(kept)
      assert kept, "the crop left no region (expected the uncropped image then)"
      for row, task in zip(text_rows, ("aref", "gcap")):
        text, box = _split(tok.decode(row), task)
        assert text in kept, (task, text, sorted(kept))
        np.testing.assert_allclose(tok.parse_box(box), kept[text], atol=0.5 / BINS + 1e-6)
  assert cropped > 12 and dropped > 0   # crops happened and some regions left them


def test_evaluation_never_crops_and_no_crop_leaves_training_unchanged(data, tok):
  def images(config, train):
    if train:
      ds = input_pipeline.make_train_dataset(config, tok, process_index=0, process_count=1)
      return next(ds.as_numpy_iterator())["image"]
    ds = input_pipeline.make_eval_dataset(config, tok, process_index=0, process_count=1)
    return np.concatenate([b["image"] for b in ds.as_numpy_iterator()])

  plain = _config(data, None)
  np.testing.assert_array_equal(images(_config(data, CROP), False), images(plain, False))
  np.testing.assert_array_equal(images(_config(data, dict(kind="none")), True),
                                images(plain, True))
  assert not np.array_equal(images(_config(data, CROP), True), images(plain, True))


def test_cropping_train_maps_have_no_stateful_randomness(data, tok):
  ds = input_pipeline.make_train_dataset(_config(data, CROP), tok, process_index=0,
                                         process_count=1)
  graph_def = graph_pb2.GraphDef.FromString(
      ds._as_serialized_graph().numpy())   # pylint: disable=protected-access
  ops = {n.op for f in graph_def.library.function for n in f.node_def}
  stateful = {op for op in ops if getattr(op_def_registry.get(op), "is_stateful", False)}
  assert stateful <= {"SentencepieceTokenizeOp", "CheckNumerics", "ReadFile", "Assert", "If"}
  assert "StatelessSampleDistortedBoundingBox" in ops and "DecodeAndCropJpeg" in ops
