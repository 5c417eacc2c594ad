"""Box conventions: pixel edges, quantization, written order, IoU (expected values by hand)."""
import numpy as np
import pytest

from locca_jax import boxes


def test_quantize_dequantize_round_trip_is_within_half_a_bin():
  rng = np.random.default_rng(0)
  for bins in (500, 1000, 7):
    b = rng.uniform(size=(1000, 4))
    decoded = boxes.dequantize(boxes.quantize(b, bins), bins)
    assert np.abs(decoded - b).max() <= 0.5 / bins + 1e-9


def test_quantize_is_floor_clipped_to_the_last_bin():
  q = boxes.quantize(np.array([0.0, 0.001, 0.999, 1.0, -0.2, 1.7, 0.5]), 500)
  # floor(v*500): 0, 0.5->0, 499.5->499, 500->clip 499, negative->0, 850->499, 250.
  np.testing.assert_array_equal(q, [0, 0, 499, 499, 0, 499, 250])
  assert q.dtype == np.int32


def test_dequantize_is_the_bin_centre():
  np.testing.assert_allclose(boxes.dequantize([0, 12, 499], 500), [0.001, 0.025, 0.999])


def test_dequantize_rejects_out_of_range_ints():
  with pytest.raises(ValueError, match=r"\[0, 500\)"):
    boxes.dequantize([0, 500], 500)
  with pytest.raises(ValueError, match="bins"):
    boxes.quantize([0.5], 0)


def test_coco_xywh_to_internal_by_hand():
  # COCO [x=10, y=20, w=30, h=40] in an image of height 100, width 200:
  # ymin = 20/100, xmin = 10/200, ymax = 60/100, xmax = 40/200.
  got = boxes.from_xywh_pixels([10, 20, 30, 40], height=100, width=200)
  np.testing.assert_allclose(got, [0.2, 0.05, 0.6, 0.2])
  np.testing.assert_allclose(boxes.to_xywh_pixels(got, 100, 200), [10, 20, 30, 40])


def test_xyxy_pixels_by_hand():
  got = boxes.from_xyxy_pixels([[10, 20, 40, 60], [0, 0, 200, 100]], height=100, width=200)
  np.testing.assert_allclose(got, [[0.2, 0.05, 0.6, 0.2], [0, 0, 1, 1]])
  np.testing.assert_allclose(boxes.to_xyxy_pixels([0.2, 0.05, 0.6, 0.2], 100, 200),
                             [10, 20, 40, 60])


def test_pixel_conversions_reject_bad_input_naming_the_field():
  with pytest.raises(ValueError, match="negative width or height"):
    boxes.from_xywh_pixels([10, 20, -3, 40], 100, 200)
  with pytest.raises(ValueError, match="xmax < xmin"):
    boxes.from_xyxy_pixels([412, 33, 380, 90], 500, 500)
  with pytest.raises(ValueError, match="height"):
    boxes.from_xywh_pixels([10, 20, 30, 40], 0, 200)
  with pytest.raises(ValueError, match=r"shape \[\.\.\., 4\]"):
    boxes.from_xywh_pixels([10, 20, 30], 100, 200)
  with pytest.raises(ValueError, match="finite"):
    boxes.to_xyxy_pixels([0.1, np.nan, 0.2, 0.3], 100, 200)


def test_validate_names_the_offending_box():
  boxes.validate([[0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]])
  with pytest.raises(ValueError, match=r"gt\[1\].*outside \[0, 1\]"):
    boxes.validate([[0, 0, 1, 1], [0.1, 0.2, 1.3, 0.4]], "gt")
  with pytest.raises(ValueError, match="ymax < ymin"):
    boxes.validate([0.5, 0.2, 0.3, 0.4])


def test_reorder_writes_the_named_coordinates():
  yxyx = np.array([0.1, 0.2, 0.3, 0.4])  # ymin xmin ymax xmax
  np.testing.assert_array_equal(boxes.reorder(yxyx), [0.2, 0.1, 0.4, 0.3])
  np.testing.assert_array_equal(boxes.reorder(yxyx, "ymin xmin ymax xmax"), yxyx)
  np.testing.assert_array_equal(boxes.reorder(yxyx, "xmax,ymax,xmin,ymin"), [0.4, 0.3, 0.2, 0.1])


def test_reorder_inverse_undoes_reorder_for_every_order():
  import itertools  # pylint: disable=g-import-not-at-top
  b = np.random.default_rng(1).uniform(size=(5, 3, 4))
  for perm in itertools.permutations(boxes.COORDS):
    order = " ".join(perm)
    np.testing.assert_array_equal(boxes.reorder_inverse(boxes.reorder(b, order), order), b)


def test_reorder_rejects_bad_order():
  with pytest.raises(ValueError, match="permutation"):
    boxes.reorder([0.1, 0.2, 0.3, 0.4], "xmin ymin xmax xmax")


def test_iou_hand_computed():
  a = np.array([[0.0, 0.0, 0.5, 0.5],     # area 0.25
                [0.0, 0.0, 1.0, 1.0]])    # area 1
  b = np.array([[0.0, 0.0, 0.5, 0.5],     # identical to a[0]
                [0.25, 0.25, 0.75, 0.75],  # overlap with a[0]: 0.25^2 = 0.0625
                [0.6, 0.6, 0.9, 0.9]])    # disjoint from a[0]
  expected = np.array([
      [1.0, 0.0625 / (0.25 + 0.25 - 0.0625), 0.0],
      [0.25, 0.25, 0.09],
  ])
  got = boxes.iou(a, b)
  assert got.shape == (2, 3)
  np.testing.assert_allclose(got, expected)
  np.testing.assert_allclose(boxes.iou(a, b[:2], pairwise=False), [1.0, 0.25])


def test_iou_of_empty_and_inverted_boxes_is_zero():
  z = boxes.iou([[0.3, 0.3, 0.3, 0.3]], [[0.3, 0.3, 0.3, 0.3], [0.5, 0.5, 0.2, 0.2]])
  np.testing.assert_array_equal(z, [[0.0, 0.0]])


def test_functions_accept_jax_arrays_under_jit():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  b = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, 0.5, 1.0, 0.9]], np.float32)

  @jax.jit
  def f(x):
    q = boxes.quantize(x, 500)
    return (boxes.reorder_inverse(boxes.reorder(boxes.dequantize(q, 500))),
            boxes.iou(x, x, pairwise=False), boxes.to_xyxy_pixels(x, 100, 200))

  deq, iou, px = f(jnp.asarray(b))
  assert np.abs(np.asarray(deq) - b).max() <= 0.5 / 500 + 1e-6
  np.testing.assert_allclose(iou, [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(px, [[40, 10, 80, 30], [100, 0, 180, 100]], rtol=1e-6)
