"""Preprocessing ops (tf, in-graph): decode, resize with boxes, value range, box filtering.

Every op is a small function of tensors; `preprocess_example` chains them for one TFDS example.
Boxes follow the package convention: normalized [ymin, xmin, ymax, xmax] of the image they
belong to. Geometric ops return the boxes transformed with the image, so that after
`resize_image_and_boxes` a box is normalized w.r.t. the *resized* (model input) image.

N: objects in the example, H/W: image height/width, S: output image size (square).
"""
import tensorflow as tf

RESIZE_METHODS = ("squash", "letterbox")


def decode_image(image, channels=3):
  """Encoded png/jpeg bytes (or an already decoded uint8 [H, W, C]) -> uint8 [H, W, 3]."""
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def resize_image_and_boxes(image, boxes, size, method="squash", pad_value=0.0):
  """Resizes `image` [H, W, C] to [size, size, C] float32 and maps `boxes` [N, 4] with it.

  - "squash": stretch to size x size (aspect ratio not kept). Normalized boxes are unchanged.
  - "letterbox": scale the longer side to `size` (aspect kept), centre the result and pad the
    rest with `pad_value` (in the input's value units, i.e. 0..255 for uint8 images). Boxes are
    rescaled and offset into the padded frame.

  Returns (image float32 [size, size, C] in the input's value units, boxes float32 [N, 4]).
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f"resize method {method!r} unknown (expected one of {RESIZE_METHODS})")
  image = tf.cast(image, tf.float32)
  boxes = tf.cast(boxes, tf.float32)
  if method == "squash":
    return tf.image.resize(image, [size, size], antialias=True), boxes

  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  scale = float(size) / tf.maximum(h, w)
  new_h = tf.clip_by_value(tf.cast(tf.round(h * scale), tf.int32), 1, size)
  new_w = tf.clip_by_value(tf.cast(tf.round(w * scale), tf.int32), 1, size)
  off_y = (size - new_h) // 2
  off_x = (size - new_w) // 2
  resized = tf.image.resize(image, tf.stack([new_h, new_w]), antialias=True)
  # tf.pad has no float pad value per channel; pad (x - v) with zeros, add v back.
  out = tf.pad(resized - pad_value,
               [[off_y, size - new_h - off_y], [off_x, size - new_w - off_x], [0, 0]]) + pad_value
  out = tf.ensure_shape(out, [size, size, image.shape[-1]])

  fs = float(size)
  ys = tf.cast(new_h, tf.float32) / fs
  xs = tf.cast(new_w, tf.float32) / fs
  oy = tf.cast(off_y, tf.float32) / fs
  ox = tf.cast(off_x, tf.float32) / fs
  boxes = boxes * tf.stack([ys, xs, ys, xs]) + tf.stack([oy, ox, oy, ox])
  return out, boxes


def value_range(image, vmin=-1.0, vmax=1.0, in_min=0.0, in_max=255.0):
  """Linearly maps [in_min, in_max] to [vmin, vmax] (float32)."""
  image = tf.cast(image, tf.float32)
  return vmin + (image - in_min) * ((vmax - vmin) / (in_max - in_min))


def clip_and_filter_boxes(boxes, *per_box):
  """Clips boxes [N, 4] to [0, 1]; drops those with zero area after clipping.

  `per_box` are tensors with leading dimension N (e.g. the region texts); the same rows are
  dropped from them. Returns (boxes [M, 4], *per_box filtered).
  """
  boxes = tf.clip_by_value(tf.cast(boxes, tf.float32), 0.0, 1.0)
  keep = tf.logical_and(boxes[:, 2] > boxes[:, 0], boxes[:, 3] > boxes[:, 1])
  return (tf.boolean_mask(boxes, keep),) + tuple(tf.boolean_mask(x, keep) for x in per_box)


def preprocess_example(example, image_size, resize="squash"):
  """A TFDS `locca_shapes`-style example -> dict(image, captions, boxes, refexps).

  Reads `image` (bytes or uint8), `captions` (string [C]) and `objects` (dict with `bbox`
  [N, 4] and `refexp` [N]; may be absent). Output:
    image: float32 [S, S, 3] in [-1, 1];
    captions: string [C];
    boxes: float32 [M, 4] normalized to the resized image, clipped, non-empty;
    refexps: string [M] (the referring expression of each kept box).
  """
  image = decode_image(example["image"])
  objects = example.get("objects", {})
  boxes = tf.reshape(tf.cast(objects.get("bbox", tf.zeros([0, 4])), tf.float32), [-1, 4])
  refexps = tf.reshape(objects.get("refexp", tf.zeros([0], tf.string)), [-1])
  image, boxes = resize_image_and_boxes(image, boxes, image_size, resize)
  boxes, refexps = clip_and_filter_boxes(boxes, refexps)
  image = value_range(tf.clip_by_value(image, 0.0, 255.0))
  return dict(
      image=image,
      captions=tf.reshape(example.get("captions", tf.zeros([0], tf.string)), [-1]),
      boxes=boxes,
      refexps=refexps,
  )
