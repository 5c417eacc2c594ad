"""The common example layout every source produces, and the checks every record goes through.

Common example (one image; what `preprocess.preprocess_example` + `tasks` consume):
  image        string []        encoded image bytes (jpeg / png / gif / bmp)
  image/id     int64 []         image id used by `exclude_image_ids` (a COCO id where known), -1
  image/size   int32 [2]        (height, width) the source's boxes were normalized with, or
                                (-1, -1) when the boxes came normalized (TFDS)
  captions     string [C]       image-level captions
  objects      bbox   float32 [N, 4]   normalized [ymin, xmin, ymax, xmax] of the image
               refexp string [N]       the region's text (referring expression, category, phrase)
               score  float32 [N]      detector score of a pseudo-box (1.0 for annotated boxes)
  record       string []        where the record came from ("train.jsonl line 12"), for errors

`clean` checks a common example in graph and returns the usable part plus one count per
reason in REASONS:
  record-level (the whole record is skipped):
    unreadable_image     bytes of no known image format, or cut short (no JPEG end marker /
                         PNG IEND chunk / GIF trailer in the last bytes)  [check_image only]
    image_size_mismatch  the JPEG / PNG header's size differs from `image/size`  [check_image]
    excluded_image_id    `image/id` is in config.input.exclude_image_ids (not an error)
    no_text              nothing usable left: no caption and no region
  region-level (only that region is dropped):
    box_out_of_range     a coordinate outside [-box_tolerance, 1 + box_tolerance] or not finite
                         (coordinates within the tolerance are clipped to [0, 1])
    box_empty            zero (or negative) area after clipping
    empty_text           the region's text is empty or only spaces
    long_text            the region's text is longer than max_text_len characters
    low_score            score < min_box_score (pseudo-box filtering, not an error)
    crowd                COCO `is_crowd` boxes (when the source drops them, not an error)
  caption-level (only that caption is dropped):
    empty_caption, long_caption   as for region texts
With `strict`, every reason except excluded_image_id, no_text, low_score and crowd raises
instead (tf.errors.InvalidArgumentError naming the record, the field and what was expected).

Records parsed on the host (file sources) also count what only the parser can see, in a
`BadRecordCounter`, by PARSE_REASONS:
  malformed_json    a JSONL line that is not JSON
  bad_record        a record without a usable image path, or a field of the wrong type
  missing_file      the image file does not exist
  unreadable_image  the image header cannot be read (when the size had to be read from it)
  bad_box           a region's box is not 4 finite numbers with max >= min (w, h >= 0)
  bad_region        a region / annotation / caption entry of the wrong form (e.g. no text,
                    unknown category)
  no_text           no caption and no usable region
  excluded_image_id exclude_image_ids (exact count; for TFDS with config.input.count_excluded)
  crowd             COCO-JSON crowd annotations (with drop_crowd)
"""
import collections
import dataclasses
import json
import os
from typing import Optional

from absl import logging
import numpy as np
import tensorflow as tf

RECORD_REASONS = ("unreadable_image", "image_size_mismatch", "excluded_image_id", "no_text")
REGION_REASONS = ("box_out_of_range", "box_empty", "empty_text", "long_text", "low_score",
                  "crowd")
CAPTION_REASONS = ("empty_caption", "long_caption")
REASONS = RECORD_REASONS + REGION_REASONS + CAPTION_REASONS
# Counted on the host by BadRecordCounter (file sources' parsers; exact exclusion counts).
PARSE_REASONS = ("malformed_json", "bad_record", "missing_file", "unreadable_image", "bad_box",
                 "bad_region", "no_text", "excluded_image_id", "crowd")
# Intended filtering, never an error in strict mode.
NOT_ERRORS = ("excluded_image_id", "no_text", "low_score", "crowd")

DEFAULT_MIN_BOX_SCORE = 0.3
DEFAULT_MAX_TEXT_LEN = 512
DEFAULT_BOX_TOLERANCE = 0.01

_STRICT_HINT = "config.input.strict=True; set it to False to skip and count such records"


@dataclasses.dataclass(frozen=True)
class CleanOptions:
  """What `clean` keeps. From config.input via `from_config`."""
  min_box_score: float = DEFAULT_MIN_BOX_SCORE
  max_text_len: int = DEFAULT_MAX_TEXT_LEN
  box_tolerance: float = DEFAULT_BOX_TOLERANCE
  strict: bool = False
  exclude_image_ids: Optional[np.ndarray] = None   # sorted unique int64, or None
  drop_records: bool = True    # False (eval): never skip a record, only regions / captions

  @classmethod
  def from_config(cls, config_input, *, drop_records=True):
    get = lambda k, d: d if config_input is None else config_input.get(k, d)
    ids = load_image_ids(get("exclude_image_ids", None))
    min_score = get("min_box_score", DEFAULT_MIN_BOX_SCORE)
    return cls(min_box_score=float(DEFAULT_MIN_BOX_SCORE if min_score is None else min_score),
               max_text_len=int(get("max_text_len", DEFAULT_MAX_TEXT_LEN)),
               box_tolerance=float(get("box_tolerance", DEFAULT_BOX_TOLERANCE)),
               strict=bool(get("strict", False)),
               exclude_image_ids=ids, drop_records=drop_records)


def load_image_ids(spec):
  """config.input.exclude_image_ids -> sorted unique int64 array (or None).

  Accepts None, a list of ints, or a path (any tf.io.gfile path) to a JSON file holding a list
  of ints or a dict with key "image_ids", or to a text file with one id per line.
  """
  if spec is None:
    return None
  what = "config.input.exclude_image_ids"
  if isinstance(spec, str):
    if not tf.io.gfile.exists(spec):
      raise ValueError(f"{what}: file {spec!r} does not exist (expected a JSON list of image "
                       "ids, a JSON dict with key 'image_ids', or one id per line)")
    with tf.io.gfile.GFile(spec) as f:
      text = f.read()
    try:
      data = json.loads(text)
    except json.JSONDecodeError:
      data = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
      if "image_ids" not in data:
        raise ValueError(f"{what}: {spec} is a JSON object without key 'image_ids' (expected "
                         "a list of ints or {'image_ids': [...]})")
      data = data["image_ids"]
    where = spec
  else:
    data, where = spec, what
  try:
    ids = [int(x) for x in data]
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: expected a list of integer image ids ({e})") from e
  return np.unique(np.asarray(ids, np.int64))


class BadRecordCounter:
  """Records / regions skipped on the host (while parsing a file), by reason.

  `skip(reason, where, message)` counts one (or raises ValueError(f"{where}: {message}") when
  strict); the first message of each reason is kept in `examples` and logged. `note` counts
  intended skips (excluded ids, crowd boxes, records without any text), which never raise.
  """

  def __init__(self, strict: bool = False, label: str = ""):
    self.strict = strict
    self.label = label
    self.counts = collections.Counter()
    self.examples = {}

  def skip(self, reason: str, where: str, message: str):
    assert reason in PARSE_REASONS, reason
    text = f"{where}: {message}"
    if self.strict:
      raise ValueError(f"{text} ({_STRICT_HINT})")
    self.counts[reason] += 1
    if reason not in self.examples:
      self.examples[reason] = text
      logging.warning("%s: skipping (%s): %s (further ones are counted, not logged)",
                      self.label or "data", reason, text)

  def note(self, reason: str, where: str = "", message: str = ""):
    """Counts an intended skip (a reason in NOT_ERRORS): never raises, even when strict."""
    assert reason in NOT_ERRORS, reason
    self.counts[reason] += 1
    if reason not in self.examples and where:
      self.examples[reason] = f"{where}: {message}"

  def merge(self, other: "BadRecordCounter"):
    self.counts.update(other.counts)
    for k, v in other.examples.items():
      self.examples.setdefault(k, v)

  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "nothing skipped"


# ------------------------------------------------------------------------------ building
def make_common(image, captions, bbox, refexp, *, score=None, image_id=None, image_size=None,
                record=""):
  """The common example from tensors (casts and reshapes to the documented layout)."""
  bbox = tf.reshape(tf.cast(bbox, tf.float32), [-1, 4])
  refexp = tf.reshape(tf.convert_to_tensor(refexp, tf.string), [-1])
  if score is None:
    score = tf.ones(tf.shape(refexp), tf.float32)
  return {
      "image": tf.convert_to_tensor(image, tf.string),
      "image/id": tf.constant(-1, tf.int64) if image_id is None else tf.cast(image_id, tf.int64),
      "image/size": (tf.constant([-1, -1], tf.int32) if image_size is None
                     else tf.reshape(tf.cast(image_size, tf.int32), [2])),
      "captions": tf.reshape(tf.convert_to_tensor(captions, tf.string), [-1]),
      "objects": {"bbox": bbox, "refexp": refexp,
                  "score": tf.reshape(tf.cast(score, tf.float32), [-1])},
      "record": tf.convert_to_tensor(record, tf.string),
  }


# ------------------------------------------------------------------------------ image bytes
def _bytes(data, start, n):
  """uint8 [n] of data[start:start + n] (zero-padded past the end), as int32."""
  chunk = tf.strings.substr(data, tf.minimum(start, tf.strings.length(data)), n)
  chunk = tf.strings.substr(tf.strings.join([chunk, tf.constant(b"\0" * n)]), 0, n)
  return tf.cast(tf.io.decode_raw(chunk, tf.uint8), tf.int32)


def _contains(tail, pattern):
  """Whether the int32 byte vector `tail` contains the byte sequence `pattern`."""
  k = len(pattern)
  n = tf.shape(tail)[0] - k + 1
  hits = tf.ones([tf.maximum(n, 0)], tf.bool)
  for j, b in enumerate(pattern):
    hits = tf.logical_and(hits, tf.equal(tail[j:j + tf.maximum(n, 0)], b))
  return tf.reduce_any(hits)


_TAIL = 64  # bytes searched for an end marker (writers may pad a little after it)


def image_format(data):
  """int32: 1 jpeg, 2 png, 3 gif, 4 bmp, 0 unknown (from the magic bytes)."""
  h = _bytes(data, 0, 8)
  is_jpeg = (h[0] == 0xFF) & (h[1] == 0xD8) & (h[2] == 0xFF)
  is_png = tf.reduce_all(tf.equal(h, [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]))
  is_gif = tf.reduce_all(tf.equal(h[:4], [0x47, 0x49, 0x46, 0x38]))
  is_bmp = (h[0] == 0x42) & (h[1] == 0x4D)
  # Branch-free (no tf.cond): the formats exclude each other.
  return tf.reduce_sum(tf.cast(tf.stack([is_jpeg, is_png, is_gif, is_bmp]), tf.int32) *
                       tf.constant([1, 2, 3, 4]))


def image_bytes_ok(data):
  """bool: a known format that is not cut short (its end marker is in the last bytes)."""
  fmt = image_format(data)
  n = tf.strings.length(data)
  start = tf.maximum(n - _TAIL, 0)
  tail = tf.cast(tf.io.decode_raw(tf.strings.substr(data, start, _TAIL), tf.uint8), tf.int32)
  bmp_size = tf.reduce_sum(_bytes(data, 2, 4) * tf.constant([1, 256, 65536, 16777216]))
  complete = tf.stack([tf.constant(False),                  # unknown format
                       _contains(tail, (0xFF, 0xD9)),       # JPEG end-of-image marker
                       _contains(tail, tuple(b"IEND")),     # PNG final chunk
                       _contains(tail, (0x3B,)),            # GIF trailer
                       n >= bmp_size])                      # BMP: the size in its header
  return tf.gather(complete, fmt)


def header_size(data):
  """int32 [2] (height, width) from a JPEG / PNG header; (-1, -1) for other formats."""
  fmt = image_format(data)
  b = _bytes(data, 16, 8)
  png = tf.stack([b[4] * 16777216 + b[5] * 65536 + b[6] * 256 + b[7],
                  b[0] * 16777216 + b[1] * 65536 + b[2] * 256 + b[3]])
  jpeg = tf.cond(tf.equal(fmt, 1), lambda: tf.image.extract_jpeg_shape(data)[:2],
                 lambda: tf.constant([-1, -1], tf.int32))
  return tf.where(tf.equal(fmt, 1), jpeg, tf.where(tf.equal(fmt, 2), png, -1))


# ------------------------------------------------------------------------------ checking
def _is_member(x, sorted_ids):
  """Whether int64 scalar `x` is in the (non-empty, sorted) numpy array `sorted_ids`."""
  ids = tf.constant(sorted_ids, tf.int64)
  i = tf.searchsorted(ids, tf.reshape(x, [1]))[0]
  return tf.equal(tf.gather(ids, tf.minimum(i, len(sorted_ids) - 1)), x)


def _strict_check(ok, record, message, *data):
  return tf.debugging.Assert(ok, [record, ": " + message, *data, f"({_STRICT_HINT})"],
                             summarize=16)


def clean(example, opts: CleanOptions, *, exclude=True, crowd=None, check_image=True):
  """Checks a common example. Returns (example, counts int64 [len(REASONS)], keep bool).

  The returned example has only the usable regions / captions (region texts and captions
  stripped of surrounding spaces, boxes clipped to [0, 1]); `keep` is False for a record to
  skip (always True with opts.drop_records=False). `crowd` (bool [N], optional) marks regions
  to drop as "crowd". `exclude=False` ignores opts.exclude_image_ids for this source.
  `check_image=False` skips the image-bytes checks (unreadable_image, image_size_mismatch),
  e.g. for TFDS sources, whose images were checked when the dataset was prepared.
  """
  image, record = example["image"], example["record"]
  objects = example["objects"]
  bbox = tf.reshape(objects["bbox"], [-1, 4])
  text = tf.strings.strip(objects["refexp"])
  score = objects["score"]
  captions = tf.strings.strip(example["captions"])

  declared = example["image/size"]
  if check_image:
    readable = image_bytes_ok(image)
    check_size = tf.logical_and(readable, declared[0] > 0)
    header = tf.cond(check_size, lambda: header_size(image), lambda: declared)
    size_ok = tf.logical_or(header[0] < 0, tf.reduce_all(tf.equal(header, declared)))
  else:
    readable, size_ok, header = tf.constant(True), tf.constant(True), declared
  if exclude and opts.exclude_image_ids is not None and opts.exclude_image_ids.size:
    excluded = _is_member(example["image/id"], opts.exclude_image_ids)
  else:
    excluded = tf.constant(False)
  usable = readable & size_ok & tf.logical_not(excluded)

  finite = tf.reduce_all(tf.math.is_finite(bbox), -1)
  tol = opts.box_tolerance
  in_range = finite & tf.reduce_all((bbox >= -tol) & (bbox <= 1.0 + tol), -1)
  clipped = tf.clip_by_value(tf.where(finite[:, None], bbox, 0.0), 0.0, 1.0)
  nonempty = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  text_len = tf.strings.length(text, unit="UTF8_CHAR")
  is_crowd = tf.zeros_like(finite) if crowd is None else tf.reshape(tf.cast(crowd, tf.bool), [-1])
  region_reasons = []   # Each region gets the first reason that applies.
  remaining = tf.ones_like(finite)
  for bad in (~in_range, ~nonempty, tf.equal(text_len, 0), text_len > opts.max_text_len,
              score < opts.min_box_score, is_crowd):
    bad = remaining & bad
    region_reasons.append(bad)
    remaining = remaining & ~bad
  cap_len = tf.strings.length(captions, unit="UTF8_CHAR")
  cap_empty = tf.equal(cap_len, 0)
  cap_long = ~cap_empty & (cap_len > opts.max_text_len)
  cap_keep = ~cap_empty & ~cap_long

  has_text = tf.logical_or(tf.reduce_any(remaining), tf.reduce_any(cap_keep))
  keep = usable & has_text if opts.drop_records else tf.constant(True)
  count = lambda mask: tf.reduce_sum(tf.cast(mask, tf.int64))
  gate = tf.cast(usable, tf.int64)   # parts of unusable records are not counted
  counts = tf.stack(
      [count(~readable), count(readable & ~size_ok), count(readable & size_ok & excluded),
       count(usable & ~has_text)] +
      [count(r) * gate for r in region_reasons] +
      [count(cap_empty) * gate, count(cap_long) * gate])

  deps = []
  if opts.strict:
    names = dict(zip(REASONS, tf.unstack(counts)))
    deps += [
        _strict_check(readable, record, "field image: not a complete JPEG / PNG / GIF / BMP "
                      "file (unknown format or cut short)"),
        _strict_check(size_ok, record, "field image/size: the source's (height, width)",
                      declared, "differs from the image file's", header),
        _strict_check(tf.equal(names["box_out_of_range"], 0), record,
                      "field objects/bbox: boxes outside [0, 1] (expected normalized [ymin, "
                      "xmin, ymax, xmax] of the image) at regions",
                      tf.where(region_reasons[0])[:, 0], tf.boolean_mask(bbox, region_reasons[0])),
        _strict_check(tf.equal(names["box_empty"], 0), record,
                      "field objects/bbox: boxes with zero area at regions",
                      tf.where(region_reasons[1])[:, 0], tf.boolean_mask(bbox, region_reasons[1])),
        _strict_check(tf.equal(names["empty_text"], 0), record,
                      "field objects/refexp: empty region text at regions",
                      tf.where(region_reasons[2])[:, 0]),
        _strict_check(tf.equal(names["long_text"], 0), record,
                      f"field objects/refexp: region text longer than max_text_len="
                      f"{opts.max_text_len} characters at regions",
                      tf.where(region_reasons[3])[:, 0]),
        _strict_check(tf.equal(names["empty_caption"], 0), record,
                      "field captions: empty caption at", tf.where(cap_empty)[:, 0]),
        _strict_check(tf.equal(names["long_caption"], 0), record,
                      f"field captions: caption longer than max_text_len={opts.max_text_len} "
                      "characters at", tf.where(cap_long)[:, 0]),
    ]
  with tf.control_dependencies(deps):
    counts = tf.identity(counts)
  out = dict(example)
  out["captions"] = tf.boolean_mask(captions, cap_keep)
  out["objects"] = {"bbox": tf.boolean_mask(clipped, remaining),
                    "refexp": tf.boolean_mask(text, remaining),
                    "score": tf.boolean_mask(score, remaining)}
  return out, counts, keep


def counts_to_dict(counts, prefix=""):
  """{prefix + reason: int} for a counts vector in REASONS order (zeros left out)."""
  return {prefix + r: int(c) for r, c in zip(REASONS, np.asarray(counts).tolist()) if c}


def resolve_path(base_dir, path):
  """`path` as is when absolute or a URL-like gfile path, else joined to `base_dir`."""
  if "://" in path or os.path.isabs(path) or not base_dir:
    return path
  return os.path.join(base_dir, path)
