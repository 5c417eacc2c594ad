"""Preprocessing ops (tf, in-graph): decode, crop and resize with boxes, box filtering.

Every op is a small function of tensors; `preprocess_example` chains them for one TFDS example.
Boxes follow the package convention: normalized [ymin, xmin, ymax, xmax] of the image they
belong to. Geometric ops return the boxes transformed with the image, so that after
`resize_image_and_boxes` a box is normalized w.r.t. the *resized* (model input) image.

Random crop (training only; `config.input.crop`, see `crop_options`): an Inception-style crop
(`tf.image.stateless_sample_distorted_bounding_box`: area fraction and aspect ratio w/h drawn
from ranges, seeded by the example's stateless seed) taken before the resize. Boxes move into
the crop frame and are clipped to it; a region that keeps less than `min_visible` of its area
(or none) is dropped together with its text, so it is never an ARef / GCap target. The sampler
is asked for a crop that keeps at least `min_visible` of at least one region; if none is kept
anyway (the sampler gave up after `max_attempts`), the example falls back to the uncropped
image, so a crop never turns a grounded example into a caption-only one. JPEG bytes are decoded
only inside the crop window (`tf.image.decode_and_crop_jpeg`).

N: objects in the example, H/W: image height/width, S: output image size (square).
"""
import tensorflow as tf

RESIZE_METHODS = ("squash", "letterbox")
CROP_KINDS = ("none", "inception")
# config.input.crop fields and their defaults (kind "inception").
CROP_DEFAULTS = dict(kind="inception", area=(0.5, 1.0), aspect=(3 / 4, 4 / 3),
                     min_visible=0.5, max_attempts=10)
CROP_SEED_SALT = 0xC809   # crop seed = stateless_fold_in(example seed, CROP_SEED_SALT)


def decode_image(image, channels=3):
  """Encoded png/jpeg bytes (or an already decoded uint8 [H, W, C]) -> uint8 [H, W, 3]."""
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def _is_number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def crop_options(config_crop, where="config.input.crop"):
  """`config.input.crop` -> a validated dict with every field of CROP_DEFAULTS, or None (off).

  None, absent or kind="none": no crop. kind="inception" takes
    area=(lo, hi)     fraction of the image's area the crop covers, 0 < lo <= hi <= 1;
    aspect=(lo, hi)   crop width / height, 0 < lo <= hi;
    min_visible=v     a region is kept if at least this fraction of its box's area is inside
                      the crop (0 <= v <= 1; 0: any overlap of positive area);
    max_attempts=n    tries of the sampler before it returns the whole image.
  """
  if config_crop is None:
    return None
  cfg = config_crop.to_dict() if hasattr(config_crop, "to_dict") else config_crop
  if not hasattr(cfg, "keys"):
    raise ValueError(f"{where}={config_crop!r} (expected None or a dict such as "
                     f"dict(kind='inception', area=(0.5, 1.0), aspect=(3/4, 4/3)))")
  cfg = dict(cfg)
  unknown = set(cfg) - set(CROP_DEFAULTS)
  if unknown:
    raise ValueError(f"{where}: unknown fields {sorted(unknown)} (known: "
                     f"{sorted(CROP_DEFAULTS)})")
  kind = cfg.get("kind", CROP_DEFAULTS["kind"])
  if kind not in CROP_KINDS:
    raise ValueError(f"{where}.kind={kind!r} unknown (expected one of {CROP_KINDS})")
  if kind == "none":
    return None
  opts = dict(CROP_DEFAULTS)
  opts.update(cfg)
  for name, upper in (("area", 1.0), ("aspect", None)):
    value = opts[name]
    ok = (isinstance(value, (list, tuple)) and len(value) == 2 and
          all(_is_number(v) for v in value) and 0 < value[0] <= value[1] and
          (upper is None or value[1] <= upper))
    if not ok:
      bound = "0 < lo <= hi <= 1" if upper else "0 < lo <= hi"
      raise ValueError(f"{where}.{name}={value!r} (expected two numbers (lo, hi) with {bound})")
    opts[name] = (float(value[0]), float(value[1]))
  v = opts["min_visible"]
  if not _is_number(v) or not 0 <= v <= 1:
    raise ValueError(f"{where}.min_visible={v!r} (expected a number in [0, 1]: the fraction of "
                     "a region's box area that must stay inside the crop)")
  opts["min_visible"] = float(v)
  n = opts["max_attempts"]
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ValueError(f"{where}.max_attempts={n!r} (expected a positive integer)")
  return opts


def crop_boxes(boxes, image_hw, begin, size, min_visible):
  """Maps boxes into a crop window and decides which regions the crop keeps.

  Args:
    boxes: float [N, 4] normalized yxyx of the image of size `image_hw` (int [2]: H, W).
    begin, size: int [2] (y, x) and (height, width) of the crop window, in pixels.
    min_visible: float; a region is kept if the part of its box inside the window is at least
      this fraction of the box's area (and is not empty).

  Returns:
    (boxes float32 [N, 4] normalized yxyx of the crop, clipped to [0, 1]; keep bool [N]).
  """
  boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
  hw = tf.cast(image_hw, tf.float32)
  offset = tf.cast(begin, tf.float32) / hw
  scale = hw / tf.cast(size, tf.float32)
  offset, scale = tf.tile(offset, [2]), tf.tile(scale, [2])
  moved = (boxes - offset) * scale
  clipped = tf.clip_by_value(moved, 0.0, 1.0)
  area = lambda b: tf.maximum(b[:, 2] - b[:, 0], 0.0) * tf.maximum(b[:, 3] - b[:, 1], 0.0)
  visible, full = area(clipped), area(moved)
  keep = (visible > 0) & (visible >= min_visible * full)
  return clipped, keep


def crop_window(image_hw, boxes, seed, opts):
  """Samples an Inception-style crop window of an image of size `image_hw` (int32 [2]).

  `boxes` (float [N, 4] normalized yxyx, clipped) are given to the sampler, which looks for a
  crop keeping at least `min_visible` of one of them (none: any crop of the area / aspect
  ranges). If the sampled window keeps no region although the image has some, the window is the
  whole image. Returns (begin int32 [2], size int32 [2]) in pixels (y, x) / (height, width).
  """
  boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
  image_hw = tf.cast(image_hw, tf.int32)
  has_boxes = tf.shape(boxes)[0] > 0
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([image_hw, [3]], 0), boxes[None], seed=seed,
      min_object_covered=tf.where(has_boxes, opts["min_visible"], 0.0),
      aspect_ratio_range=opts["aspect"], area_range=opts["area"],
      max_attempts=opts["max_attempts"], use_image_if_no_bounding_boxes=True)
  begin, size = begin[:2], size[:2]
  _, keep = crop_boxes(boxes, image_hw, begin, size, opts["min_visible"])
  fallback = has_boxes & tf.logical_not(tf.reduce_any(keep))
  begin = tf.where(fallback, tf.zeros_like(begin), begin)
  size = tf.where(fallback, image_hw, size)
  return begin, size


def _is_jpeg(data):
  return tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")


def random_crop_image_and_boxes(image, boxes, seed, opts):
  """Decodes `image` inside a random crop window (`crop_window`) and maps `boxes` into it.

  Args:
    image: encoded bytes (JPEG: only the window is decoded) or uint8 [H, W, 3].
    boxes: float [N, 4] normalized yxyx of the image, clipped to [0, 1].
    seed: int [2] stateless seed (the same seed gives the same window).
    opts: `crop_options(...)` (not None).

  Returns:
    (uint8 [h, w, 3] the crop, boxes float32 [N, 4] normalized to the crop and clipped,
     keep bool [N]: the regions that stay, see `crop_boxes`).
  """
  def slice_window(decoded):
    hw = tf.shape(decoded)[:2]
    begin, size = crop_window(hw, boxes, seed, opts)
    return (tf.slice(decoded, tf.concat([begin, [0]], 0), tf.concat([size, [-1]], 0)),
            begin, size, hw)

  if image.dtype != tf.string:
    crop, begin, size, hw = slice_window(decode_image(image))
  else:
    def jpeg():
      hw = tf.image.extract_jpeg_shape(image)[:2]
      begin, size = crop_window(hw, boxes, seed, opts)
      window = tf.concat([begin, size], 0)
      return tf.image.decode_and_crop_jpeg(image, window, channels=3), begin, size, hw

    crop, begin, size, hw = tf.cond(_is_jpeg(image), jpeg,
                                    lambda: slice_window(decode_image(image)))
  crop.set_shape([None, None, 3])
  new_boxes, keep = crop_boxes(boxes, hw, begin, size, opts["min_visible"])
  return crop, new_boxes, keep


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
  if image.dtype not in (tf.uint8, tf.float32):
    image = tf.cast(image, tf.float32)
  # uint8 goes into the resize as is: it reads integers as floats, saving a cast pass.
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
  paddings = [[off_y, size - new_h - off_y], [off_x, size - new_w - off_x], [0, 0]]
  if pad_value:
    out = tf.pad(resized - pad_value, paddings) + pad_value
  else:
    out = tf.pad(resized, paddings)
  out = tf.ensure_shape(out, [size, size, image.shape[-1]])

  fs = float(size)
  ys = tf.cast(new_h, tf.float32) / fs
  xs = tf.cast(new_w, tf.float32) / fs
  oy = tf.cast(off_y, tf.float32) / fs
  ox = tf.cast(off_x, tf.float32) / fs
  boxes = boxes * tf.stack([ys, xs, ys, xs]) + tf.stack([oy, ox, oy, ox])
  return out, boxes


def to_pixels(image):
  """A resized float image [..., C] in 0..255 -> uint8 (rounded to the nearest integer).

  The pipelines hand uint8 pixels to the device, where the model maps them to [-1, 1]
  (`models.vit.ViT`): 4x fewer bytes to batch, copy and transfer than float32, and the value
  range runs fused into the jitted step instead of as passes over every image on the host
  (docs/PERFORMANCE.md). A plain cast (no clip) is exact here: the antialiased bilinear resize is
  a convex combination of uint8 pixels, so its output lies in [0, 255] up to float rounding,
  far inside [-0.5, 255.5) where `x + 0.5` truncates to the nearest integer.
  """
  return tf.cast(image + 0.5, tf.uint8)


def clip_and_filter_boxes(boxes, *per_box):
  """Clips boxes [N, 4] to [0, 1]; drops those with zero area after clipping.

  `per_box` are tensors with leading dimension N (e.g. the region texts); the same rows are
  dropped from them. Returns (boxes [M, 4], *per_box filtered).
  """
  boxes = tf.clip_by_value(tf.cast(boxes, tf.float32), 0.0, 1.0)
  keep = tf.logical_and(boxes[:, 2] > boxes[:, 0], boxes[:, 3] > boxes[:, 1])
  return (tf.boolean_mask(boxes, keep),) + tuple(tf.boolean_mask(x, keep) for x in per_box)


def preprocess_example(example, image_size, resize="squash", crop=None, seed=None):
  """A TFDS `locca_shapes`-style example -> dict(image, captions, boxes, refexps).

  Reads `image` (bytes or uint8), `captions` (string [C]) and `objects` (dict with `bbox`
  [N, 4] and `refexp` [N]; may be absent). `crop` (a `crop_options` dict; training only) takes
  a random crop, drawn from `seed` (int [2]), before the resize. Output:
    image: uint8 [S, S, 3], the resized pixels (the model maps them to [-1, 1]);
    captions: string [C];
    boxes: float32 [M, 4] normalized to the resized image, clipped, non-empty;
    refexps: string [M] (the referring expression of each kept box).
  """
  objects = example.get("objects", {})
  boxes = tf.reshape(tf.cast(objects.get("bbox", tf.zeros([0, 4])), tf.float32), [-1, 4])
  refexps = tf.reshape(objects.get("refexp", tf.zeros([0], tf.string)), [-1])
  if crop is None:
    image = decode_image(example["image"])
  else:
    if seed is None:
      raise ValueError("preprocess_example: crop needs the example's stateless seed (int [2])")
    boxes, refexps = clip_and_filter_boxes(boxes, refexps)
    crop_seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64),
                                                         CROP_SEED_SALT)
    image, boxes, keep = random_crop_image_and_boxes(example["image"], boxes, crop_seed, crop)
    boxes, refexps = tf.boolean_mask(boxes, keep), tf.boolean_mask(refexps, keep)
  image, boxes = resize_image_and_boxes(image, boxes, image_size, resize)
  boxes, refexps = clip_and_filter_boxes(boxes, refexps)
  return dict(
      image=to_pixels(image),
      captions=tf.reshape(example.get("captions", tf.zeros([0], tf.string)), [-1]),
      boxes=boxes,
      refexps=refexps,
  )
