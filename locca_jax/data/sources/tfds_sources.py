"""TFDS sources: a prepared TFDS dataset -> common examples (see `common`).

Layouts (chosen from the builder name, or `layout=` in the data spec):
  locca          any dataset with locca_shapes' features: `image`, `captions` Sequence(Text),
                 `objects` Sequence({bbox: BBoxFeature, refexp: Text[, score: float32]}),
                 optional `image/id`. Passed through unchanged (locca_shapes, your own builds).
  coco           `coco/2014`, `coco/2017`: objects {bbox, label: ClassLabel(80), is_crowd}.
                 Region text = the category name (`info.features['objects']['label'].names`);
                 no captions. Crowd boxes are dropped (counted as "crowd") unless
                 `drop_crowd=False`.
  coco_captions  `coco_captions` (Karpathy splits of COCO 2014): captions = `captions/text`, plus
                 the COCO objects as above unless `objects=False`.
  ref_coco       `ref_coco/{refcoco_unc, refcoco_google, refcocoplus_unc, refcocog_google,
                 refcocog_umd}`: every referred object (`objects/bbox`) with ONE of its
                 referring expressions (`objects/refexp/raw`), drawn per example from the
                 stateless seed; no captions. Masks and `coco_annotations` are not read.

Each process reads its own part of the split (`tfds.split_for_jax_process`), in file order.
"""
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from locca_jax.data.sources import common

LAYOUTS = ("locca", "coco", "coco_captions", "ref_coco")
_LAYOUT_OF_BUILDER = {"coco": "coco", "coco_captions": "coco_captions", "ref_coco": "ref_coco"}


def get_builder(config_data):
  """A data spec (name, data_dir) -> a prepared TFDS builder."""
  name = config_data["name"]
  data_dir = config_data.get("data_dir", None)
  base, _, variant = name.partition("/")
  if base == "locca_shapes":
    from locca_jax.data import locca_shapes  # pylint: disable=g-import-not-at-top
    return locca_shapes.prepare(variant or "base", data_dir)
  builder = tfds.builder(name, data_dir=data_dir)
  if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    raise ValueError(
        f"config.input.data.name={name!r}: no prepared TFDS dataset in {builder.data_dir} "
        f"(data_dir={data_dir!r}); prepare it first, e.g. `tfds build {name} "
        f"--data_dir=...`, or use locca_shapes/base")
  return builder


def process_split(builder, split, process_index, process_count):
  """This process's disjoint part of `split` and its number of examples."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
  if split not in builder.info.splits and "[" not in split and "+" not in split:
    raise ValueError(f"config.input.data.split={split!r} not in {builder.name} "
                     f"(available: {sorted(builder.info.splits.keys())})")
  sub = tfds.split_for_jax_process(split, process_index=process_index,
                                   process_count=process_count)
  return sub, builder.info.splits[sub].num_examples


def head_split(spec, limit: int) -> str:
  """`spec["split"]` cut to its first `limit` records (all of them if the split is shorter).

  For `max_examples`: evaluating "at most N" of a split smaller than N takes the whole split.
  """
  split = spec["split"]
  if "[" in split or "+" in split:
    raise ValueError(f"max_examples={limit} needs a plain split name, got split={split!r} "
                     "(slice the split or drop max_examples)")
  builder = get_builder(spec)
  if split not in builder.info.splits:
    raise ValueError(f"split={split!r} not in {builder.name} "
                     f"(available: {sorted(builder.info.splits.keys())})")
  return f"{split}[:{min(int(limit), builder.info.splits[split].num_examples)}]"


def read(builder, split, decoders=None):
  """Examples in a fixed order, image left encoded (decoded later, in the parallel map)."""
  return builder.as_dataset(
      split=split, shuffle_files=False,
      decoders=decoders or {"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False, add_tfds_id=False))


def _full_name(builder):
  config = builder.builder_config.name if builder.builder_config else None
  return f"{builder.name}/{config}" if config else builder.name


class TfdsSource:
  """One TFDS split as a source of common examples, for one process.

  Attributes: label (metrics name), builder, layout, split (this process's part),
  num_examples (in that part), exclude (apply config.input.exclude_image_ids), check_images
  (check the image bytes in graph; default False), parse_counter (empty unless
  config.input.count_excluded: TFDS records are checked in graph).
  """

  def __init__(self, spec, *, process_index, process_count, passthrough=(), strict=False):
    self.spec = dict(spec)
    self.builder = get_builder(self.spec)
    self.name = _full_name(self.builder)
    self.label = self.spec.get("label") or self.spec["name"].replace("/", "_")
    self.layout = self.spec.get("layout") or _LAYOUT_OF_BUILDER.get(self.builder.name, "locca")
    if self.layout not in LAYOUTS:
      raise ValueError(f"config.input.data.layout={self.layout!r} for {self.name} unknown "
                       f"(expected one of {LAYOUTS})")
    self.full_split = self.spec["split"]
    self.split, self.num_examples = process_split(self.builder, self.full_split, process_index,
                                                  process_count)
    self.exclude = bool(self.spec.get("exclude", True))
    # TFDS stored the images when preparing; checking their bytes again is optional.
    self.check_images = bool(self.spec.get("check_images", False))
    self.parse_counter = common.BadRecordCounter(strict, self.label)
    self.passthrough = tuple(passthrough)
    features = self.builder.info.features
    self._check_features(features)
    if self.layout in ("coco", "coco_captions"):
      self._label_names = list(features["objects"]["label"].names)

  def _check_features(self, features):
    need = dict(
        locca=(), coco=("image", "objects/bbox", "objects/label", "objects/is_crowd"),
        coco_captions=("image", "captions/text", "objects/bbox", "objects/label",
                       "objects/is_crowd"),
        ref_coco=("image", "objects/bbox", "objects/refexp/raw"))[self.layout]
    flat = _flat_keys(features)
    missing = [k for k in need if k not in flat]
    if self.layout == "locca":
      if "image" not in flat or not ({"captions", "objects/bbox"} & flat):
        missing = ["image and captions and/or objects/{bbox, refexp}"]
      elif "objects/bbox" in flat and "objects/refexp" not in flat:
        missing = ["objects/refexp"]
    missing += [k for k in self.passthrough if k not in flat]
    if missing:
      raise ValueError(f"{self.name}: features {missing} missing for layout {self.layout!r} "
                       f"(has {sorted(flat)}); see locca_jax/data/sources/tfds_sources.py")

  def decoders(self):
    """PartialDecoding of the features this layout reads (never masks or panoptic images)."""
    if self.layout == "locca":
      return {"image": tfds.decode.SkipDecoding()}
    objects = {"bbox": True}
    if self.layout == "ref_coco":
      objects["refexp"] = {"raw": True}
    else:
      objects.update(label=True, is_crowd=True)
    wanted = {"image": True, "objects": objects}
    if "image/id" in self.builder.info.features:
      wanted["image/id"] = True
    if self.layout == "coco_captions":
      wanted["captions"] = {"text": True}
    for k in self.passthrough:
      wanted[k] = True
    return tfds.decode.PartialDecoding(wanted, decoders={"image": tfds.decode.SkipDecoding()})

  def dataset(self, split=None):
    """This process's records (or those of `split`), finite, in file order."""
    return read(self.builder, split or self.split, self.decoders())

  def to_common(self, raw, seed, index):
    """In graph: raw TFDS example -> common example (objects may carry `crowd`)."""
    image_id = raw.get("image/id", tf.constant(-1, tf.int64))
    if "image/id" in raw:
      record = tf.strings.join([f"{self.name} split {self.full_split!r}: image/id ",
                                tf.strings.as_string(image_id)])
    else:
      record = tf.strings.join([f"{self.name} split {self.full_split!r}: record at stream "
                                "position ", tf.strings.as_string(index)])
    objects = raw.get("objects", {})
    crowd = None
    captions = tf.zeros([0], tf.string)
    if self.layout == "locca":
      captions = raw.get("captions", captions)
      bbox = objects.get("bbox", tf.zeros([0, 4]))
      text = objects.get("refexp", tf.zeros([0], tf.string))
      score = objects.get("score", None)
    elif self.layout in ("coco", "coco_captions"):
      if self.layout == "coco_captions":
        captions = raw["captions"]["text"]
      bbox = objects["bbox"]
      text = tf.gather(tf.constant(self._label_names or [""], tf.string), objects["label"])
      score = None
      if self.spec.get("drop_crowd", True):
        crowd = objects["is_crowd"]
      if self.layout == "coco_captions" and not self.spec.get("objects", True):
        bbox, text, crowd = bbox[:0], text[:0], None
    else:  # ref_coco
      bbox = objects["bbox"]
      text = sample_one_per_row(objects["refexp"]["raw"],
                                tf.random.experimental.stateless_fold_in(seed, 0x5EED))
      score = None
    ex = common.make_common(raw["image"], captions, bbox, text, score=score, image_id=image_id,
                            record=record)
    if crowd is not None:
      ex["objects"]["crowd"] = tf.reshape(tf.cast(crowd, tf.bool), [-1])
    for k in self.passthrough:
      ex[k] = raw[k]
    return ex


def sample_one_per_row(ragged, seed):
  """string [N] holding one element of each row of a ragged string [N, None] ("" if empty)."""
  lengths = ragged.row_lengths()
  n = tf.shape(lengths)[0]
  u = tf.random.stateless_uniform([n], seed=seed)
  k = tf.cast(tf.floor(u * tf.cast(lengths, tf.float32)), tf.int64)
  k = tf.minimum(k, tf.maximum(lengths - 1, 0))
  values = tf.concat([ragged.values, [""]], 0)
  flat = tf.where(lengths > 0, ragged.row_starts() + k, tf.size(values, out_type=tf.int64) - 1)
  return tf.gather(values, flat)


def _flat_keys(features, prefix=""):
  """{'image', 'objects/bbox', 'objects/refexp/raw', ...} of a TFDS FeaturesDict."""
  keys = set()
  inner = getattr(features, "feature", features)   # Sequence(...) -> its feature
  if isinstance(inner, tfds.features.FeaturesDict):
    for k in inner.keys():
      keys.add(prefix + k)
      keys |= _flat_keys(inner[k], prefix + k + "/")
  return keys
