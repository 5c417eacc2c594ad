"""Preprocessing ops: resize keeps boxes on the pixels they mark; clipping; value range."""
import numpy as np
import pytest
import tensorflow as tf

from locca_jax.data import preprocess


def _image_with_rectangle(h, w, box_px):
  """uint8 [h, w, 3] black image with a white filled rectangle at pixel box (y0, x0, y1, x1)."""
  image = np.zeros([h, w, 3], np.uint8)
  y0, x0, y1, x1 = box_px
  image[y0:y1, x0:x1] = 255
  return image


def _box_from_pixels(image, threshold):
  """Pixel box (y0, x0, y1, x1) (exclusive end) of pixels brighter than threshold."""
  ys, xs = np.nonzero(image[..., 0] > threshold)
  return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float64)


@pytest.mark.parametrize("method", ["squash", "letterbox"])
@pytest.mark.parametrize("h,w", [(60, 100), (100, 60), (80, 80)])
def test_resize_moves_boxes_with_the_pixels(method, h, w):
  box_px = (12, 30, 41, 71) if w >= 71 else (30, 12, 71, 41)
  image = _image_with_rectangle(h, w, box_px)
  box = np.array(box_px, np.float32) / np.array([h, w, h, w], np.float32)
  size = 64
  out, out_boxes = preprocess.resize_image_and_boxes(
      tf.constant(image), tf.constant(box[None]), size, method)
  out, out_boxes = out.numpy(), out_boxes.numpy()
  assert out.shape == (size, size, 3) and out.dtype == np.float32
  measured = _box_from_pixels(out, threshold=127.5)
  np.testing.assert_allclose(out_boxes[0] * size, measured, atol=1.5)
  if method == "squash":
    np.testing.assert_allclose(out_boxes[0], box, atol=1e-6)


def test_letterbox_pads_the_short_side_and_centres_the_image():
  image = np.full([50, 100, 3], 200, np.uint8)  # -> 32 x 64 inside a 64 x 64 frame.
  out, boxes = preprocess.resize_image_and_boxes(
      tf.constant(image), tf.constant([[0.0, 0.0, 1.0, 1.0]]), 64, "letterbox")
  out = out.numpy()
  np.testing.assert_allclose(out[:16], 0.0)
  np.testing.assert_allclose(out[48:], 0.0)
  np.testing.assert_allclose(out[16:48], 200.0, atol=1e-3)
  np.testing.assert_allclose(boxes.numpy(), [[16 / 64, 0.0, 48 / 64, 1.0]], atol=1e-6)


def test_boxes_are_clipped_and_empty_ones_dropped_with_their_texts():
  boxes = tf.constant([[-0.2, 0.1, 0.5, 0.6],     # clipped to ymin 0
                       [0.3, 1.1, 0.6, 1.5],      # fully right of the image -> dropped
                       [0.4, 0.4, 0.4, 0.9],      # zero height -> dropped
                       [0.5, 0.5, 1.3, 0.7]])     # clipped to ymax 1
  texts = tf.constant(["a", "b", "c", "d"])
  kept, kept_texts = preprocess.clip_and_filter_boxes(boxes, texts)
  np.testing.assert_allclose(kept.numpy(), [[0.0, 0.1, 0.5, 0.6], [0.5, 0.5, 1.0, 0.7]])
  assert kept_texts.numpy().tolist() == [b"a", b"d"]


def test_non_finite_boxes_never_get_through():
  boxes = tf.constant([[np.nan, 0.1, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4], [0.2, -np.inf, 0.4, np.inf]])
  kept, kept_texts = preprocess.clip_and_filter_boxes(boxes, tf.constant(["a", "b", "c"]))
  np.testing.assert_allclose(kept.numpy(), [[0.1, 0.2, 0.3, 0.4], [0.2, 0.0, 0.4, 1.0]])
  assert kept_texts.numpy().tolist() == [b"b", b"c"]


def test_value_range_maps_uint8_to_minus_one_one():
  x = preprocess.value_range(tf.constant([0, 255, 127.5]))
  np.testing.assert_allclose(x.numpy(), [-1.0, 1.0, 0.0], atol=1e-6)


def test_preprocess_example_decodes_png_and_keeps_refexps_aligned():
  image = _image_with_rectangle(40, 80, (10, 20, 30, 60))
  png = tf.io.encode_png(image)
  example = dict(
      image=png, captions=tf.constant(["a white box"]),
      objects=dict(bbox=tf.constant([[0.25, 0.25, 0.75, 0.75], [0.5, 0.5, 0.5, 0.8]]),
                   refexp=tf.constant(["the white box", "a line"])))
  out = preprocess.preprocess_example(example, image_size=32, resize="letterbox")
  assert out["image"].shape == (32, 32, 3) and out["image"].dtype == tf.float32
  assert -1.0 <= float(tf.reduce_min(out["image"])) and float(tf.reduce_max(out["image"])) <= 1.0
  assert out["refexps"].numpy().tolist() == [b"the white box"]
  # 40x80 -> 16x32 centred in 32x32: y offset 8 px, y scale 0.5.
  np.testing.assert_allclose(out["boxes"].numpy(), [[(8 + 4) / 32, 0.25, (8 + 12) / 32, 0.75]],
                             atol=1e-6)


def test_unknown_resize_method_is_an_error():
  with pytest.raises(ValueError, match="letterbox"):
    preprocess.resize_image_and_boxes(tf.zeros([4, 4, 3]), tf.zeros([0, 4]), 8, "crop")
