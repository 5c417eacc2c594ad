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


def test_to_pixels_rounds_to_the_nearest_integer_and_keeps_the_ends():
  x = np.array([0.0, -1e-4, 0.49, 0.51, 127.5, 254.6, 255.0, 255.0 + 1e-4], np.float32)
  np.testing.assert_array_equal(preprocess.to_pixels(tf.constant(x)).numpy(),
                                [0, 0, 0, 1, 128, 255, 255, 255])


def test_resize_then_to_pixels_matches_a_float64_resize_within_half_a_level():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (37, 53, 3)).astype(np.uint8)
  resized, _ = preprocess.resize_image_and_boxes(tf.constant(image), tf.zeros([0, 4]), 24)
  reference = tf.image.resize(tf.constant(image, tf.float64), [24, 24], antialias=True).numpy()
  pixels = preprocess.to_pixels(resized).numpy()
  assert pixels.dtype == np.uint8 and 0.0 <= reference.min() and reference.max() <= 255.0
  assert np.abs(pixels - reference).max() <= 0.5 + 1e-3


def test_preprocess_example_decodes_png_and_keeps_refexps_aligned():
  image = _image_with_rectangle(40, 80, (10, 20, 30, 60))
  png = tf.io.encode_png(image)
  example = dict(
      image=png, captions=tf.constant(["a white box"]),
      objects=dict(bbox=tf.constant([[0.25, 0.25, 0.75, 0.75], [0.5, 0.5, 0.5, 0.8]]),
                   refexp=tf.constant(["the white box", "a line"])))
  out = preprocess.preprocess_example(example, image_size=32, resize="letterbox")
  assert out["image"].shape == (32, 32, 3) and out["image"].dtype == tf.uint8
  # 40x80 -> 16x32 centred: rows 0-7 and 24-31 are padding (0); the white box is 255.
  assert int(tf.reduce_max(out["image"][:8])) == 0 and int(tf.reduce_max(out["image"])) == 255
  assert out["refexps"].numpy().tolist() == [b"the white box"]
  # 40x80 -> 16x32 centred in 32x32: y offset 8 px, y scale 0.5.
  np.testing.assert_allclose(out["boxes"].numpy(), [[(8 + 4) / 32, 0.25, (8 + 12) / 32, 0.75]],
                             atol=1e-6)


def test_unknown_resize_method_is_an_error():
  with pytest.raises(ValueError, match="letterbox"):
    preprocess.resize_image_and_boxes(tf.zeros([4, 4, 3]), tf.zeros([0, 4]), 8, "crop")


# ------------------------------------------------------------------------------ random crop
CROP = dict(kind="inception", area=(0.3, 0.6), aspect=(3 / 4, 4 / 3), min_visible=0.5)


def test_crop_maps_boxes_into_the_crop_frame_by_hand_arithmetic():
  # Image 80 high, 100 wide; crop window rows 10..50, columns 20..70 (begin (10, 20), size
  # (40, 50)). Boxes in pixels (y0, x0, y1, x1):
  #   (20, 30, 40, 60) inside: -> ((20-10)/40, (30-20)/50, (40-10)/40, (60-20)/50)
  #   (0, 60, 30, 90) keeps rows 10..30 x columns 60..70 = 200 of its 900 px^2 (22%):
  #       -> clipped (0, 40/50, 20/40, 1)
  #   (60, 0, 80, 10) entirely below the window.
  px = np.array([[20, 30, 40, 60], [0, 60, 30, 90], [60, 0, 80, 10]], np.float32)
  boxes = px / np.array([80, 100, 80, 100], np.float32)
  for min_visible, keep in ((0.5, [True, False, False]), (0.2, [True, True, False]),
                            (0.0, [True, True, False])):
    out, kept = preprocess.crop_boxes(tf.constant(boxes), [80, 100], [10, 20], [40, 50],
                                      min_visible)
    assert kept.numpy().tolist() == keep
    np.testing.assert_allclose(out.numpy()[:2], [[0.25, 0.2, 0.75, 0.8], [0.0, 0.8, 0.5, 1.0]],
                               atol=1e-6)


def _crop_seed(seed):
  return tf.random.experimental.stateless_fold_in(tf.constant(seed, tf.int64),
                                                  preprocess.CROP_SEED_SALT)


def test_crop_drops_regions_outside_with_their_texts():
  # 100 x 100 image, four 20 x 20 px regions in the corners and one in the centre; crops of a
  # quarter of the image area never hold all five.
  image = np.zeros([100, 100, 3], np.uint8)
  px = np.array([[0, 0, 20, 20], [0, 80, 20, 100], [80, 0, 100, 20], [80, 80, 100, 100],
                 [40, 40, 60, 60]], np.float64)
  boxes = px / 100.0
  texts = np.array([b"top left", b"top right", b"bottom left", b"bottom right", b"centre"])
  opts = preprocess.crop_options(dict(area=(0.25, 0.25), aspect=(1.0, 1.0), min_visible=0.5))
  dropped_some = 0
  for s in range(12):
    example = dict(image=tf.io.encode_png(image), captions=tf.constant(["x"]),
                   objects=dict(bbox=tf.constant(boxes, tf.float32), refexp=tf.constant(texts)))
    out = preprocess.preprocess_example(example, 50, "squash", crop=opts, seed=[s, 1])
    begin, size = (t.numpy() for t in preprocess.crop_window([100, 100], boxes, _crop_seed([s, 1]),
                                                             opts))
    assert size.tolist() == [50, 50]   # a quarter of the area, square
    # Independent arithmetic: the part of each box inside the window, in pixels.
    y0, x0 = begin
    inter_h = np.clip(np.minimum(px[:, 2], y0 + 50) - np.maximum(px[:, 0], y0), 0, None)
    inter_w = np.clip(np.minimum(px[:, 3], x0 + 50) - np.maximum(px[:, 1], x0), 0, None)
    keep = inter_h * inter_w >= 0.5 * 400
    assert out["refexps"].numpy().tolist() == texts[keep].tolist()
    expected = (px[keep] - [y0, x0, y0, x0]) / 50.0
    np.testing.assert_allclose(out["boxes"].numpy(), np.clip(expected, 0, 1), atol=1e-6)
    dropped_some += int(not keep.all())
  assert dropped_some == 12


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_cropped_and_resized_image_shows_the_rectangle_where_its_box_says(fmt):
  # A red rectangle on grey; any visible part counts (min_visible=0), so the output box is the
  # visible part of the rectangle, measured back from the pixels.
  h, w, size = 120, 160, 64
  image = np.full([h, w, 3], 128, np.uint8)
  box_px = (30, 50, 90, 110)
  image[box_px[0]:box_px[2], box_px[1]:box_px[3]] = (230, 20, 20)
  encoded = tf.io.encode_png(image) if fmt == "png" else tf.io.encode_jpeg(image, quality=95)
  box = np.array(box_px, np.float32) / np.array([h, w, h, w], np.float32)
  opts = preprocess.crop_options(dict(CROP, min_visible=0.0))
  clipped = 0
  for s in range(10):
    example = dict(image=encoded, captions=tf.constant(["x"]),
                   objects=dict(bbox=tf.constant(box[None]), refexp=tf.constant(["red"])))
    out = preprocess.preprocess_example(example, size, "squash", crop=opts, seed=[s, 2])
    assert out["boxes"].shape[0] == 1   # kept, or the uncropped image if the crop missed it
    pixels = out["image"].numpy().astype(np.float64)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80)
    ys, xs = np.nonzero(red)
    measured = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float64)
    np.testing.assert_allclose(out["boxes"].numpy()[0] * size, measured, atol=1.5)
    clipped += int(np.any(out["boxes"].numpy()[0] * size < 0.5) or
                   np.any(out["boxes"].numpy()[0] * size > size - 0.5))
  assert clipped > 0   # some crops cut the rectangle: clipping was exercised


def test_crop_windows_follow_the_area_and_aspect_ranges_and_the_seed():
  opts = preprocess.crop_options(CROP)
  windows = set()
  for s in range(30):
    seed = tf.constant([s, 5], tf.int64)
    begin, size = (t.numpy() for t in preprocess.crop_window([300, 400], tf.zeros([0, 4]), seed,
                                                             opts))
    again = preprocess.crop_window([300, 400], tf.zeros([0, 4]), seed, opts)
    assert [begin.tolist(), size.tolist()] == [t.numpy().tolist() for t in again]
    area = size[0] * size[1] / (300 * 400)
    aspect = size[1] / size[0]
    assert 0.3 - 0.01 <= area <= 0.6 + 0.01, (size, area)
    assert 3 / 4 - 0.02 <= aspect <= 4 / 3 + 0.02, (size, aspect)
    assert np.all(begin >= 0) and begin[0] + size[0] <= 300 and begin[1] + size[1] <= 400
    windows.add((*begin, *size))
  assert len(windows) > 20


def test_crop_that_keeps_no_region_falls_back_to_the_whole_image():
  # One 40 x 40 px region in the corner of a 200 x 200 image; with min_visible=0 the sampler
  # accepts any 100 x 100 crop, most of which (~84%) miss the region. Those give the
  # whole image instead: a crop never leaves an example with regions without any.
  boxes = np.array([[0.0, 0.0, 0.2, 0.2]], np.float32)
  opts = preprocess.crop_options(dict(area=(0.25, 0.25), aspect=(1.0, 1.0), min_visible=0.0))
  whole = cropped = 0
  for s in range(40):
    begin, size = (t.numpy() for t in preprocess.crop_window([200, 200], boxes,
                                                             tf.constant([s, 0], tf.int64), opts))
    if size.tolist() == [200, 200]:
      whole += 1
    else:
      assert size.tolist() == [100, 100]
      assert begin[0] < 40 and begin[1] < 40, begin   # the window overlaps the region
      cropped += 1
  assert whole > 0 and cropped > 0


def test_crop_options_are_validated_and_default_off():
  assert preprocess.crop_options(None) is None
  assert preprocess.crop_options(dict(kind="none")) is None
  opts = preprocess.crop_options(dict(kind="inception"))
  assert opts == dict(kind="inception", area=(0.5, 1.0), aspect=(0.75, 4 / 3), min_visible=0.5,
                      max_attempts=10)
  for bad, match in ((dict(kind="random"), "kind"), (dict(area=(0.5, 1.5)), "area"),
                     (dict(area=(0.8, 0.5)), "area"), (dict(aspect=(0, 2)), "aspect"),
                     (dict(min_visible=2), "min_visible"), (dict(max_attempts=0), "max_attempts"),
                     (dict(size=3), "unknown fields")):
    with pytest.raises(ValueError, match=f"config.input.crop.*{match}"):
      preprocess.crop_options(bad)
