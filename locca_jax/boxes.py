"""Box conventions: the one place where boxes change representation.

Inside the code a box is **normalized `[ymin, xmin, ymax, xmax]` in [0, 1] of the original
image** (the TFDS `BBoxFeature` convention), called "yxyx" below. Everything else is an edge
format and is converted here, and only here:

  COCO JSON          `[x, y, w, h]` in pixels        from_xywh_pixels / to_xywh_pixels
  corner pixels      `[xmin, ymin, xmax, ymax]`      from_xyxy_pixels / to_xyxy_pixels
  box in text        integers in `[0, bins)`         quantize / dequantize
  written order      e.g. "xmin ymin xmax ymax"      reorder / reorder_inverse

Quantization: `q = clip(floor(v * bins), 0, bins - 1)`, decoded to the bin centre
`(q + 0.5) / bins`, so a round trip is off by at most half a bin (`0.5 / bins`).

Pure numpy (no TensorFlow). Functions take any array-like with a trailing axis of 4; given a
`jax.Array` they compute with `jax.numpy` (and skip the value checks that need concrete values,
so they also work under `jax.jit`). Shapes: `[..., 4]` means any leading shape.
"""
import numpy as np

COORDS = ("ymin", "xmin", "ymax", "xmax")   # the internal order
DEFAULT_ORDER = "xmin ymin xmax ymax"        # the order written in text (LocCa default)


def _xp(x):
  """The array module for `x`: jax.numpy for jax arrays / tracers, else numpy."""
  if type(x).__module__.startswith(("jax", "jaxlib")):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return jnp
  return np


def _is_concrete(x):
  """True when values can be inspected (not a jax tracer)."""
  if not type(x).__module__.startswith(("jax", "jaxlib")):
    return True
  import jax  # pylint: disable=g-import-not-at-top
  return not isinstance(x, jax.core.Tracer)


def _as_array(boxes, name):
  """`boxes` as a float array with a trailing axis of 4, or a ValueError naming `name`."""
  xp = _xp(boxes)
  if xp is np:
    try:
      boxes = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{name}: expected numbers with a trailing axis of 4, got {boxes!r}"
                       ) from e
  elif not xp.issubdtype(boxes.dtype, xp.floating):
    boxes = boxes.astype(xp.float32)
  if boxes.ndim == 0 or boxes.shape[-1] != 4:
    raise ValueError(f"{name}: expected shape [..., 4], got shape {tuple(boxes.shape)}")
  if _is_concrete(boxes) and not bool(np.all(np.isfinite(np.asarray(boxes)))):
    raise ValueError(f"{name}: expected finite values, got {np.asarray(boxes).tolist()}")
  return xp, boxes


def _check_image_size(height, width):
  for field, v in (("height", height), ("width", width)):
    if not _is_concrete(v):
      continue
    v = np.asarray(v)
    if not np.all(np.isfinite(v)) or not np.all(v > 0):
      raise ValueError(f"image {field}: expected a positive number of pixels, got "
                       f"{v.tolist()}")


def _check_ordered(boxes, name, lo, hi, fmt):
  """Raises if any box has max < min; `lo`/`hi` are (index, label) of the checked pairs."""
  if not _is_concrete(boxes):
    return
  b = np.asarray(boxes)
  for (i_lo, l_lo), (i_hi, l_hi) in zip(lo, hi):
    bad = b[..., i_hi] < b[..., i_lo]
    if np.any(bad):
      first = np.argwhere(bad)[0]
      idx = tuple(int(i) for i in first)
      raise ValueError(f"{name}{list(idx) if idx else ''}: {b[idx].tolist()} has {l_hi} < "
                       f"{l_lo} (expected {fmt})")


def validate(boxes, name="boxes", *, atol=1e-6):
  """Checks that `boxes` are internal boxes; returns them as an array.

  Expected: shape [..., 4], finite, `[ymin, xmin, ymax, xmax]` within [0, 1] (up to `atol`)
  with ymin <= ymax and xmin <= xmax. Raises ValueError naming `name`, the offending box, and
  what was expected.
  """
  _, b = _as_array(boxes, name)
  fmt = "normalized [ymin, xmin, ymax, xmax] in [0, 1]"
  if _is_concrete(b):
    a = np.asarray(b)
    bad = np.any((a < -atol) | (a > 1 + atol), axis=-1)
    if np.any(bad):
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"{name}{list(idx) if idx else ''}: {a[idx].tolist()} is outside "
                       f"[0, 1] (expected {fmt})")
  _check_ordered(b, name, [(0, "ymin"), (1, "xmin")], [(2, "ymax"), (3, "xmax")], fmt)
  return b


def clip(boxes):
  """Clips internal boxes to [0, 1]. [..., 4] -> [..., 4]."""
  xp, b = _as_array(boxes, "boxes")
  return xp.clip(b, 0.0, 1.0)


def area(boxes):
  """Area of internal boxes (0 for inverted ones). [..., 4] -> [...]."""
  xp, b = _as_array(boxes, "boxes")
  return (xp.maximum(b[..., 2] - b[..., 0], 0.0) * xp.maximum(b[..., 3] - b[..., 1], 0.0))


# ------------------------------------------------------------------------------ pixel edges
def from_xywh_pixels(b, height, width):
  """COCO `[x, y, w, h]` in pixels of a `height` x `width` image -> internal yxyx.

  Not clipped: a box reaching outside the image stays outside [0, 1] (see `clip`).
  Raises ValueError for negative w / h or a non-positive image size.
  """
  xp, b = _as_array(b, "box [x, y, w, h]")
  _check_image_size(height, width)
  if _is_concrete(b):
    a = np.asarray(b)
    bad = np.any(a[..., 2:] < 0, axis=-1)
    if np.any(bad):
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"box [x, y, w, h]{list(idx) if idx else ''}: {a[idx].tolist()} has a "
                       "negative width or height (expected COCO [x, y, w, h] in pixels)")
  x, y, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  return xp.stack([y / height, x / width, (y + h) / height, (x + w) / width], axis=-1)


def from_xyxy_pixels(b, height, width):
  """`[xmin, ymin, xmax, ymax]` in pixels of a `height` x `width` image -> internal yxyx.

  Not clipped. Raises ValueError for xmax < xmin, ymax < ymin or a non-positive image size.
  """
  xp, b = _as_array(b, "box [xmin, ymin, xmax, ymax]")
  _check_image_size(height, width)
  _check_ordered(b, "box [xmin, ymin, xmax, ymax]", [(0, "xmin"), (1, "ymin")],
                 [(2, "xmax"), (3, "ymax")], "[xmin, ymin, xmax, ymax] in pixels")
  x0, y0, x1, y1 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  return xp.stack([y0 / height, x0 / width, y1 / height, x1 / width], axis=-1)


def to_xyxy_pixels(boxes, height, width):
  """Internal yxyx -> `[xmin, ymin, xmax, ymax]` in pixels of a `height` x `width` image."""
  xp, b = _as_array(boxes, "boxes")
  _check_image_size(height, width)
  y0, x0, y1, x1 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  return xp.stack([x0 * width, y0 * height, x1 * width, y1 * height], axis=-1)


def to_xywh_pixels(boxes, height, width):
  """Internal yxyx -> COCO `[x, y, w, h]` in pixels of a `height` x `width` image."""
  xp, b = _as_array(boxes, "boxes")
  _check_image_size(height, width)
  y0, x0, y1, x1 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  return xp.stack([x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height], axis=-1)


# ------------------------------------------------------------------------------ quantization
def _check_bins(bins):
  if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
    raise ValueError(f"bins: expected a positive integer, got {bins!r}")


def quantize(boxes, bins):
  """Coordinates in [0, 1] -> integers `clip(floor(v * bins), 0, bins - 1)` (int32).

  Works on any shape (boxes [..., 4] or single coordinates); values outside [0, 1] clip to the
  first / last bin. The product `v * bins` is computed in the input's float dtype (cast
  float32 boxes stay float32, which is what the in-graph tokenizer does).
  """
  _check_bins(bins)
  xp = _xp(boxes)
  v = xp.asarray(boxes)
  if not xp.issubdtype(v.dtype, xp.floating):
    v = v.astype(xp.float32 if xp is not np else np.float64)
  if _is_concrete(v) and not bool(np.all(np.isfinite(np.asarray(v)))):
    raise ValueError(f"boxes: expected finite values to quantize, got {np.asarray(v).tolist()}")
  q = xp.floor(v * xp.asarray(bins, v.dtype))
  return xp.clip(q, 0, bins - 1).astype(xp.int32)


def dequantize(q, bins):
  """Integers in [0, bins) -> bin centres `(q + 0.5) / bins` (float64; float32 for jax)."""
  _check_bins(bins)
  xp = _xp(q)
  q = xp.asarray(q)
  if not xp.issubdtype(q.dtype, xp.integer):
    if _is_concrete(q) and not np.all(np.asarray(q) == np.round(np.asarray(q))):
      raise ValueError(f"quantized coordinates: expected integers, got {np.asarray(q).tolist()}")
  if _is_concrete(q):
    a = np.asarray(q)
    if np.any((a < 0) | (a >= bins)):
      raise ValueError(f"quantized coordinates: expected integers in [0, {bins}), got "
                       f"{a.tolist()}")
  dtype = np.float64 if xp is np else xp.float32
  return (q.astype(dtype) + 0.5) / bins


# ------------------------------------------------------------------------------ written order
def order_indices(order=DEFAULT_ORDER):
  """Indices into yxyx for a written order, e.g. "xmin ymin xmax ymax" -> (1, 0, 3, 2).

  `order` is a string (space- or comma-separated) or a sequence naming each of ymin, xmin,
  ymax, xmax exactly once.
  """
  names = order.replace(",", " ").split() if isinstance(order, str) else list(order)
  if sorted(names) != sorted(COORDS):
    raise ValueError(f"box order: expected a permutation of {' '.join(COORDS)!r}, got "
                     f"{order!r}")
  return tuple(COORDS.index(n) for n in names)


def reorder(boxes_yxyx, order=DEFAULT_ORDER):
  """Internal yxyx [..., 4] -> coordinates in `order` [..., 4] (e.g. xmin ymin xmax ymax)."""
  idx = order_indices(order)
  xp = _xp(boxes_yxyx)
  b = xp.asarray(boxes_yxyx)
  if b.ndim == 0 or b.shape[-1] != 4:
    raise ValueError(f"boxes: expected shape [..., 4], got shape {tuple(b.shape)}")
  return b[..., list(idx)]


def reorder_inverse(coords, order=DEFAULT_ORDER):
  """Coordinates in `order` [..., 4] -> internal yxyx [..., 4]; inverse of `reorder`."""
  inv = np.argsort(order_indices(order))
  xp = _xp(coords)
  c = xp.asarray(coords)
  if c.ndim == 0 or c.shape[-1] != 4:
    raise ValueError(f"coordinates in order {order!r}: expected shape [..., 4], got shape "
                     f"{tuple(c.shape)}")
  return c[..., [int(i) for i in inv]]


# ------------------------------------------------------------------------------ overlap
def iou(a, b, *, pairwise=True):
  """Intersection over union of internal (or any same-unit yxyx) boxes.

  pairwise=True (default): a [N, 4], b [M, 4] -> [N, M], every box of `a` against every box
    of `b` (leading axes broadcast: a [..., N, 4], b [..., M, 4] -> [..., N, M]).
  pairwise=False: elementwise, a [..., 4] and b [..., 4] broadcast -> [...].
  Inverted boxes count as empty; when the union is empty the IoU is 0.
  """
  xp, a = _as_array(a, "a")
  _, b = _as_array(b, "b")
  if pairwise:
    a, b = a[..., :, None, :], b[..., None, :, :]
  ymin = xp.maximum(a[..., 0], b[..., 0])
  xmin = xp.maximum(a[..., 1], b[..., 1])
  ymax = xp.minimum(a[..., 2], b[..., 2])
  xmax = xp.minimum(a[..., 3], b[..., 3])
  inter = xp.maximum(ymax - ymin, 0.0) * xp.maximum(xmax - xmin, 0.0)
  union = area(a) + area(b) - inter
  return xp.where(union > 0, inter / xp.where(union > 0, union, 1.0), 0.0)
