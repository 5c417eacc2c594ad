"""tf.data input pipeline: data sources -> per-host numpy batches of images and task rows.

Train (infinite, shuffled, checkpointable):
  it = make_train_iterator(config, tokenizer, process_index=i, process_count=n)
  batch = next(it)   # image uint8 [b, S, S, 3] (pixels), text int32 [b, T, L],
                     # mask_loss float32 [b, T, L]; b = config.input.batch_size // n
  it.tf_iterator     # the tf.data iterator; saved with iterator_checkpoint.IteratorSave(it)
  it.data_metrics()  # {"data/<source>/<parse|stream>/<reason>": count} of skipped records

Eval (finite, in order, padded):
  ds = make_eval_dataset(config, tokenizer, process_index=i, process_count=n)
  for batch in ds.as_numpy_iterator(): ...   # + mask_valid float32 [b]: 1 real, 0 padding
  Every host yields the same number of batches (`int(ds.cardinality())`), and every example of
  the split appears exactly once with mask_valid 1 on exactly one host.
  ds, counts = eval_examples(config, data=spec)   # checked common examples (for evaluators)

Sources (`locca_jax.data.sources`): config.input.data is one data spec, or a list / a dict
{label: spec} of them (a weighted mixture): a TFDS dataset (locca_shapes, coco, coco_captions,
ref_coco or any dataset with locca_shapes' features), a JSONL file, a COCO-JSON file or Visual
Genome region descriptions. Every source turns its records into one common layout
(`sources.common`), which is checked (`sources.common.clean`): unusable records are skipped, bad
regions / captions dropped, pseudo-boxes with score < config.input.min_box_score dropped, and all
of it counted by reason (config.input.strict=True raises instead).

Each process reads its own disjoint part of every source (TFDS: `tfds.split_for_jax_process`;
files: record i goes to process i % process_count). The stream of one source is:
read (fixed order) -> repeat -> enumerate -> map(to_common, clean) -> scan(count skipped) ->
filter(usable) -> map(pack: one string per example, see `_pack`) -> shuffle (seeded); the
sources are mixed with `tf.data.Dataset.sample_from_datasets` (seeded, config weights), then
map(unpack, decode, crop (config.input.crop; training only), resize, task draws) -> batch ->
map(tokenize, task rows: vectorized over the batch, `tasks.build_task_rows`) -> prefetch.
All random draws in the maps are stateless, seeded by
(config.seed, process_index, source, position in the source's stream), so the batches are a pure
function of the config and the process, and an iterator restored from a checkpoint continues the
identical sequence. The iterator uses `experimental_symbolic_checkpoint`: prefetch / map buffers
are not stored (they are recomputed exactly on restore); the scan counters, shuffle buffers and
the mixture's sampler state are.

Skipped-record counters reach the trainer as one extra batch field, `data/skipped` int64
[b, num_sources, len(sources.common.REASONS)]: per element, the running totals of its source's
stream so far (including repeats). `InputIterator` pops it from every batch and keeps the
element-wise maximum; `InputIterator.data_metrics()` returns those totals plus the counts of the
host-side parse ("parse": malformed JSON, missing files, ... counted once at start-up).

Config fields read (config.input.*): data (see sources), batch_size, image_size, resize
("squash" | "letterbox"), crop (None | dict(kind="inception", ...): training only, see
`preprocess.crop_options`), seq_len, tasks, prefixes (optional), loss (optional), shuffle_buffer,
shuffle_block (optional, default 1: see `_shuffle`),
tokenizer.{sp_model, box_codec, bins, box_order}, min_box_score (0.3), max_text_len (512),
box_tolerance (0.01), strict (False), exclude_image_ids (None), count_excluded (False);
and config.seed.
"""
import os

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from locca_jax import tokenizer as tokenizer_lib
from locca_jax.data import preprocess
from locca_jax.data import sources as sources_lib
from locca_jax.data import tasks as tasks_lib
from locca_jax.data.sources import common
from locca_jax.data.sources import tfds_sources

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT_FIELDS = ("image", "text", "mask_loss")
COUNTS_FIELD = "data/skipped"   # int64 [b, num_sources, len(common.REASONS)]

# TFDS helpers, shared with the evaluators.
get_builder = tfds_sources.get_builder
_process_split = tfds_sources.process_split
_read = tfds_sources.read


def _get(cfg, key, default=None):
  return default if cfg is None else cfg.get(key, default)


def resolve_package_path(path):
  """A relative path that does not exist from the cwd is looked up in the package directory
  (so "locca_jax/assets/x.model" and "assets/x.model" work from any cwd)."""
  if os.path.isabs(path) or "://" in path or os.path.exists(path):
    return path
  for base in (os.path.dirname(PACKAGE_DIR), PACKAGE_DIR):
    candidate = os.path.join(base, path)
    if os.path.exists(candidate):
      return candidate
  return path  # The tokenizer reports the missing file.


def make_tokenizer(config_tokenizer):
  """`config.input.tokenizer` -> tokenizer.Tokenizer (sp_model resolved against the package)."""
  sp_model = _get(config_tokenizer, "sp_model", None) or tokenizer_lib.SHAPES_SP_MODEL
  return tokenizer_lib.Tokenizer(
      resolve_package_path(sp_model),
      box_codec=_get(config_tokenizer, "box_codec", "text"),
      bins=_get(config_tokenizer, "bins", 500),
      box_order=_get(config_tokenizer, "box_order", "xmin ymin xmax ymax"))


def _options():
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_symbolic_checkpoint = True
  # Exact resume needs the maps to be pure functions of (position, example): their only stateful
  # ops are the SentencePiece op, the tokenizer's CheckNumerics, reading image files and (strict
  # mode) Assert, none of which carries state that changes results (tests check this).
  return options


def _base_seed(config, process_index, source_index=0):
  """int64 [2] seed of one source's stream; source 0 keeps the single-source seed."""
  base = tf.constant([int(config.seed), int(process_index)], tf.int64)
  if source_index:
    base = tf.random.experimental.stateless_fold_in(base, source_index)
  return base


def _process_example(config, tokenizer, extra_fields=(), train=False):
  """(seed, common example) -> the per-example part: image, the task draws
  (`tasks_lib.TASK_INPUTS`) and the extra_fields that are not task outputs. `_task_rows` turns a
  batch of these into model inputs.

  `train` applies config.input.crop (the random crop is for training only)."""
  del tokenizer   # Tokenizing happens once per batch, in `_task_rows`.
  ci = config.input
  crop = preprocess.crop_options(_get(ci, "crop", None)) if train else None
  image_size, resize = int(ci.image_size), _get(ci, "resize", "squash")

  @tf.autograph.experimental.do_not_convert  # Plain graph code; skips autograph's rewrite.
  def fn(seed, example):
    ex = preprocess.preprocess_example(example, image_size, resize, crop=crop, seed=seed)
    out = dict(image=ex["image"], **tasks_lib.sample_task_inputs(ex, ci, seed))
    for k in extra_fields:
      if k not in _TASK_FIELDS:
        out[k] = example[k]
    return out

  return fn


def _task_rows(config, tokenizer, extra_fields=()):
  """A batch of `_process_example` outputs -> image, text [b, T, L], mask_loss [b, T, L]
  (+ extra_fields, + any other field passed through): vectorized over the batch."""
  ci = config.input
  wanted = [k for k in extra_fields if k in _TASK_FIELDS]

  @tf.autograph.experimental.do_not_convert
  def fn(batch):
    batch = dict(batch)
    inputs = {k: batch.pop(k) for k in tasks_lib.TASK_INPUTS}
    rows = tasks_lib.build_task_rows(inputs, tokenizer, ci)
    batch["text"], batch["mask_loss"] = rows["text"], rows["mask_loss"]
    for k in wanted:
      batch[k] = rows[k]
    return batch

  return fn


def _process_fn(config, tokenizer, process_index, extra_fields=(), train=False):
  """(stream position, example) -> the per-example part (`_process_example`), seeded by position."""
  base_seed = _base_seed(config, process_index)
  process = _process_example(config, tokenizer, extra_fields, train=train)

  @tf.autograph.experimental.do_not_convert
  def fn(index, example):
    return process(tf.random.experimental.stateless_fold_in(base_seed, index), example)

  return fn


def _per_process_batch_size(batch_size, process_count, what="config.input.batch_size"):
  if batch_size % process_count:
    raise ValueError(f"{what}={batch_size} is not divisible by process_count={process_count} "
                     "(it is the global batch size, split evenly over processes)")
  return batch_size // process_count


_TASK_FIELDS = ("truncated",)
_COMMON_FIELDS = ("image/id", "record", "seed")


def _passthrough(extra_fields):
  """extra_fields that are raw TFDS features (not task outputs, not common fields)."""
  return tuple(k for k in extra_fields if k not in _TASK_FIELDS + _COMMON_FIELDS)


# ------------------------------------------------------------------------------ sources
def make_sources(config, *, process_index, process_count, extra_fields=()):
  """config.input.data -> (specs, sources, clean options) of this process; logs parse counts."""
  ci = config.input
  specs = sources_lib.specs_from_config(ci.data)
  opts = common.CleanOptions.from_config(ci)
  passthrough = _passthrough(extra_fields)
  if passthrough and len(specs) > 1:
    raise ValueError(f"extra_fields {list(passthrough)}: raw dataset features are only "
                     "available from a single source (a mixture has image/id, record and the "
                     "task outputs)")
  srcs = []
  for spec in specs:
    src = sources_lib.make_source(spec, process_index=process_index,
                                  process_count=process_count,
                                  exclude_ids=opts.exclude_image_ids, strict=opts.strict,
                                  passthrough=passthrough)
    errors = sum(n for r, n in src.parse_counter.counts.items() if r not in common.NOT_ERRORS)
    if src.parse_counter.total():
      (logging.warning if errors else logging.info)(
          "%s: skipped while parsing (process %d): %s", src.label, process_index,
          src.parse_counter.summary())
    if src.num_examples == 0:
      raise ValueError(f"{src.label}: no usable examples for process {process_index} of "
                       f"{process_count} (parse: {src.parse_counter.summary()})")
    if (opts.exclude_image_ids is not None and src.exclude and
        isinstance(src, tfds_sources.TfdsSource) and bool(_get(ci, "count_excluded", False))):
      n = count_excluded(src, opts.exclude_image_ids)
      src.parse_counter.counts["excluded_image_id"] += n
      logging.info("%s: exclude_image_ids removes %d of %d examples read by process %d "
                   "(counted with a tf.data reduce over image/id)", src.label, n,
                   src.num_examples, process_index)
    srcs.append(src)
  return specs, srcs, opts


def count_excluded(src, sorted_ids):
  """Examples of a TfdsSource's part whose image/id is in `sorted_ids`: one finite pass that
  reads only image/id (tf.data reduce)."""
  if "image/id" not in src.builder.info.features:
    return 0
  ds = tfds_sources.read(src.builder, src.split,
                         tfds.decode.PartialDecoding({"image/id": True}))
  ids = tf.constant(sorted_ids, tf.int64)

  def add(total, ex):
    i = tf.searchsorted(ids, tf.reshape(ex["image/id"], [1]))[0]
    hit = tf.equal(tf.gather(ids, tf.minimum(i, len(sorted_ids) - 1)), ex["image/id"])
    return total + tf.cast(hit, tf.int64)

  return int(ds.reduce(tf.constant(0, tf.int64), add))


def _source_stream(config, spec, src, source_index, num_sources, opts, process_index):
  """One source's infinite stream of usable common examples (+ seed, + running counts),
  packed (`_pack`). Returns (dataset, element_spec of the unpacked example)."""
  ci = config.input
  base_seed = _base_seed(config, process_index, source_index)
  num_reasons = len(common.REASONS)
  exclude = src.exclude

  @tf.autograph.experimental.do_not_convert
  def prepare(index, raw):
    seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    ex = src.to_common(raw, seed, index)
    crowd = ex["objects"].pop("crowd", None)
    ex, counts, keep = common.clean(ex, opts, exclude=exclude, crowd=crowd,
                                    check_image=src.check_images)
    ex["seed"] = seed
    return ex, counts, keep

  n = int(src.num_examples)
  label = src.label

  @tf.autograph.experimental.do_not_convert
  def accumulate(state, elem):
    total, run = state
    ex, counts, keep = elem
    total = total + counts
    run = tf.where(keep, tf.constant(0, tf.int64), run + 1)
    # `n` consecutive records of the repeated stream are all of them: none was usable.
    check = tf.debugging.Assert(
        run < n, [f"{label}: all {n} records read by process {process_index} were skipped "
                  f"(nothing usable); counts by reason {common.REASONS}:", total], summarize=64)
    with tf.control_dependencies([check]):
      ex = dict(ex)
      ex[COUNTS_FIELD] = tf.pad(total[None], [[source_index, num_sources - source_index - 1],
                                              [0, 0]])
    return (total, run), (ex, keep)

  ds = src.dataset().repeat().enumerate()
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.scan((tf.zeros([num_reasons], tf.int64), tf.constant(0, tf.int64)), accumulate)
  ds = ds.filter(_second)
  example_spec = ds.element_spec[0]
  # One string per example from here to the model-input map (see `_pack`).
  ds = ds.map(_pack_first)
  shuffle_buffer = spec.get("shuffle_buffer")
  if shuffle_buffer is None:
    shuffle_buffer = _get(ci, "shuffle_buffer", 0)
  shuffle_buffer = int(shuffle_buffer or 0)
  block = int(_get(ci, "shuffle_block", 1) or 1)
  seed = int(config.seed) * 1009 + process_index + 7919 * source_index
  ds = _shuffle(ds, shuffle_buffer, block, seed)
  return ds, example_spec


def _shuffle(ds, buffer: int, block: int, seed: int):
  """Shuffles packed examples with a window of about `buffer` examples.

  `block` 1: tf.data's shuffle over `buffer` examples. `block` > 1: shuffles blocks of `block`
  consecutive examples (a buffer of `buffer // block` blocks), then examples within a window of
  2 blocks. With symbolic checkpointing a shuffle pays ~70 ns per buffered element for every
  element it yields, so a 50k-example buffer caps one core at ~280 images/s; in blocks of 64
  the same buffer gives 533 (567 without shuffle; docs/PERFORMANCE.md, measured with
  bench_input). What it gives up: examples adjacent in the source stay near each other
  (within a batch or two), harmless for sources shuffled when written (TFDS, tfrecord shards
  written in random order) and worth avoiding for sources sorted by anything.
  """
  if buffer <= 1:
    return ds
  if block <= 1:
    return ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
  if buffer < 2 * block:
    raise ValueError(f"config.input.shuffle_block={block} needs shuffle_buffer >= "
                     f"{2 * block} (2 blocks), got {buffer}")
  ds = ds.batch(block, drop_remainder=True)
  ds = ds.shuffle(buffer // block, seed=seed, reshuffle_each_iteration=False)
  ds = ds.unbatch()
  return ds.shuffle(2 * block, seed=seed + 1, reshuffle_each_iteration=False)


@tf.autograph.experimental.do_not_convert
def _pack_first(example, unused_keep):
  return _pack(example)


def _pack(example):
  """A nest of dense tensors -> string [k] (each tensor serialized), for the shuffle buffer.

  With symbolic checkpointing, tf.data's shuffle records its whole buffer into the in-memory
  checkpoint after every element it produces: a cost of about buffer size x tensors per element
  (tens to hundreds of ns each), paid by every element. One string per example instead of ~11
  tensors makes that ~10x cheaper (docs/PERFORMANCE.md); `_unpack` restores the nest bit for
  bit, so batches are unchanged.
  """
  return tf.stack([tf.io.serialize_tensor(t) for t in tf.nest.flatten(example)])


def _unpack(packed, spec):
  """`_pack`'s inverse; `spec` is the element spec of the nest before packing."""
  flat = [tf.ensure_shape(tf.io.parse_tensor(packed[i], s.dtype), s.shape)
          for i, s in enumerate(tf.nest.flatten(spec))]
  return tf.nest.pack_sequence_as(spec, flat)


def _common_spec(specs, labels):
  """The element spec of every source's examples (mixed sources must agree)."""
  for spec, label in zip(specs[1:], labels[1:]):
    if spec != specs[0]:
      raise ValueError(f"config.input.data: source {label} gives examples of another layout "
                       f"than {labels[0]} ({spec} vs {specs[0]})")
  return specs[0]


@tf.autograph.experimental.do_not_convert
def _second(unused_x, y):
  return y


def _weights(specs):
  w = np.array([float(s.get("weight", 1.0)) for s in specs], np.float64)
  return (w / w.sum()).tolist()


def make_train_dataset(config, tokenizer, *, process_index=None, process_count=None,
                       extra_fields=(), with_counters=False, made_sources=None):
  """Infinite, shuffled, batched tf.data.Dataset of this process's part of the train data.

  Elements: dict(image uint8 [b, S, S, 3] (the model maps it to [-1, 1]), text int32 [b, T, L], mask_loss float32 [b, T, L])
  with b = config.input.batch_size // process_count; `extra_fields` adds fields of the task
  output ("truncated": int32 [b, T]), of the common example ("image/id", "record", "seed":
  the example's stateless seed int64 [b, 2], from which its crop and task draws follow) or
  top-level TFDS features of a single TFDS source; `with_counters` adds COUNTS_FIELD.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ci = config.input
  local_batch = _per_process_batch_size(int(ci.batch_size), process_count)
  if made_sources is None:
    made_sources = make_sources(config, process_index=process_index,
                                process_count=process_count, extra_fields=extra_fields)
  specs, srcs, opts = made_sources
  made = [_source_stream(config, spec, src, s, len(srcs), opts, process_index)
          for s, (spec, src) in enumerate(zip(specs, srcs))]
  streams = [ds for ds, _ in made]
  example_spec = _common_spec([spec for _, spec in made], [src.label for src in srcs])
  if len(streams) == 1:
    ds = streams[0]
  else:
    ds = tf.data.Dataset.sample_from_datasets(
        streams, weights=_weights(specs), seed=int(config.seed) * 1009 + process_index + 1,
        stop_on_empty_dataset=False)
  process = _process_example(config, tokenizer, extra_fields, train=True)

  @tf.autograph.experimental.do_not_convert
  def fn(packed):
    ex = _unpack(packed, example_spec)
    out = process(ex["seed"], ex)
    if with_counters:
      out[COUNTS_FIELD] = ex[COUNTS_FIELD]
    return out

  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.map(_task_rows(config, tokenizer, extra_fields), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options())


class InputIterator:
  """Iterates numpy batches of a tf.data.Dataset; `tf_iterator` holds the checkpointable state.

  Attributes: dataset, tf_iterator, process_index, process_count, sources (labels),
  parse_counts ({label: {reason: n}}). A batch field COUNTS_FIELD is popped from every batch
  and folded into the running totals that `data_metrics` reports.
  """

  def __init__(self, dataset, process_index, process_count, sources=(), parse_counts=None):
    self.dataset = dataset
    self.tf_iterator = iter(dataset)
    self.process_index = process_index
    self.process_count = process_count
    self.sources = tuple(sources)
    self.parse_counts = dict(parse_counts or {})
    self._stream_counts = np.zeros([len(self.sources), len(common.REASONS)], np.int64)

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.tf_iterator)
    batch = tf.nest.map_structure(lambda t: t.numpy(), batch)
    counts = batch.pop(COUNTS_FIELD, None)
    if counts is not None:
      self._stream_counts = np.maximum(self._stream_counts, counts.max(axis=0))
    return batch

  @property
  def element_spec(self):
    spec = dict(self.dataset.element_spec)
    spec.pop(COUNTS_FIELD, None)
    return spec

  def data_metrics(self, all_processes=False):
    """{"data/<source>/parse/<reason>": n, "data/<source>/stream/<reason>": n} (non-zero only).

    parse: records / regions skipped by the host-side parser (and, for TFDS sources with
      config.input.count_excluded, the exact number of excluded images), counted once.
    stream: running totals of the in-graph checks over the records read so far by the input
      stream (a bad record counts again in every epoch), as of the batches consumed.
    Counts are this process's, or the sum over processes with `all_processes=True` (a
    collective: every process must call it at the same step).
    """
    keys, values = [], []
    for label in self.sources:   # The same keys on every process (for the allgather).
      counts = self.parse_counts.get(label, {})
      for reason in common.PARSE_REASONS:
        keys.append(f"data/{label}/parse/{reason}")
        values.append(counts.get(reason, 0))
    for s, label in enumerate(self.sources):
      for r, reason in enumerate(common.REASONS):
        keys.append(f"data/{label}/stream/{reason}")
        values.append(self._stream_counts[s, r])
    values = np.asarray(values, np.int64)
    if all_processes and self.process_count > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      values = np.asarray(multihost_utils.process_allgather(values)).reshape(
          -1, len(keys)).sum(0)
    return {k: int(v) for k, v in zip(keys, values) if v}


def make_train_iterator(config, tokenizer, *, process_index=None, process_count=None,
                        extra_fields=()):
  """`make_train_dataset` wrapped in an InputIterator (numpy batches, saveable position, skipped
  record counts in `data_metrics()`)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  made = make_sources(config, process_index=process_index, process_count=process_count,
                      extra_fields=extra_fields)
  ds = make_train_dataset(config, tokenizer, process_index=process_index,
                          process_count=process_count, extra_fields=extra_fields,
                          with_counters=True, made_sources=made)
  srcs = made[1]
  return InputIterator(ds, process_index, process_count,
                       sources=[s.label for s in srcs],
                       parse_counts={s.label: dict(s.parse_counter.counts) for s in srcs})


def eval_examples(config, *, data=None, split=None, process_index=None, process_count=None,
                  extra_fields=()):
  """This process's part of one eval source as checked common examples, in order.

  Args:
    config: reads config.seed and config.input (min_box_score, max_text_len, strict, ...).
    data: one data spec (TFDS, jsonl, coco_json or vg; default config.input.data).
    split: TFDS split (default the spec's).
    extra_fields: raw TFDS features to carry along (single TFDS source).

  Returns:
    (tf.data.Dataset of (index int64, common example), [number of examples of each process]).
    No record is skipped (exclude_image_ids does not apply): an unreadable image is an error
    naming the record; unusable regions / captions are dropped as in training (and unusable
    file records when parsing). The example's `seed` is the one training would use at `index`.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ci = config.input
  specs = sources_lib.specs_from_config(ci.data if data is None else data)
  if len(specs) != 1:
    raise ValueError(f"eval data: expected one data spec, got a mixture of {len(specs)} (a "
                     "mixture is for training)")
  spec = specs[0]
  if split:
    spec["split"] = split
  opts = common.CleanOptions.from_config(ci, drop_records=False)
  if spec["source"] == "tfds":
    src = sources_lib.make_source(spec, process_index=process_index,
                                  process_count=process_count, strict=opts.strict,
                                  passthrough=_passthrough(extra_fields))
    counts = [_process_split(src.builder, spec["split"], i, process_count)[1]
              for i in range(process_count)]
    raw = src.dataset()
  else:   # Parsed whole on every process, so that all know every process's count.
    src = sources_lib.make_source(spec, process_index=0, process_count=1, strict=opts.strict)
    total = src.num_examples
    counts = [len(range(i, total, process_count)) for i in range(process_count)]
    raw = src.dataset().shard(process_count, process_index)
  base_seed = _base_seed(config, process_index)
  image_errors = [common.REASONS.index("unreadable_image"),
                  common.REASONS.index("image_size_mismatch")]

  @tf.autograph.experimental.do_not_convert
  def prepare(index, example):
    seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    ex = src.to_common(example, seed, index)
    crowd = ex["objects"].pop("crowd", None)
    ex, skipped, _ = common.clean(ex, opts, exclude=False, crowd=crowd,
                                  check_image=src.check_images)
    check = tf.debugging.Assert(
        tf.equal(tf.reduce_sum(tf.gather(skipped, image_errors)), 0),
        [ex["record"], ": field image: not a complete JPEG / PNG / GIF / BMP file, or its size "
         "differs from the source's width/height (eval data is never skipped; fix or remove "
         "the record)"])
    with tf.control_dependencies([check]):
      ex["seed"] = tf.identity(seed)
    return index, ex

  ds = raw.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds, counts


def make_eval_dataset(config, tokenizer, *, split=None, data=None, batch_size=None,
                      process_index=None, process_count=None, extra_fields=()):
  """Finite, ordered, padded tf.data.Dataset of this process's part of an eval split.

  Args:
    config: reads config.seed and config.input (preprocessing, tasks, seq_len, ...).
    tokenizer: tokenizer.Tokenizer.
    split: TFDS split (default data's split).
    data: one data spec (TFDS, jsonl, coco_json or vg; default config.input.data).
    batch_size: global batch size (default config.input.batch_size); divided by process_count.
    extra_fields: as in make_train_dataset (padding rows hold zeros / empty strings).

  Returns:
    tf.data.Dataset of dict(image, text, mask_loss, mask_valid float32 [b], *extra_fields),
    every batch of size b; all processes get the same number of batches (known cardinality).
    The examples are those of `eval_examples` (no record skipped).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local_batch = _per_process_batch_size(int(batch_size or config.input.batch_size),
                                        process_count, "eval batch_size")
  ds, counts = eval_examples(config, data=data, split=split, process_index=process_index,
                             process_count=process_count, extra_fields=extra_fields)
  num_batches = -(-max(counts) // local_batch)
  process_fn = _process_example(config, tokenizer, extra_fields)

  @tf.autograph.experimental.do_not_convert
  def process(unused_index, example):
    out = process_fn(example["seed"], example)
    out["mask_valid"] = tf.constant(1.0, tf.float32)
    return out

  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors(
      tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)).repeat()
  ds = ds.concatenate(padding).take(num_batches * local_batch)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.map(_task_rows(config, tokenizer, extra_fields), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options())
