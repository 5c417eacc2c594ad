"""tf.data input pipeline: a TFDS split -> per-host numpy batches of images and task rows.

Train (infinite, shuffled, checkpointable):
  it = make_train_iterator(config, tokenizer, process_index=i, process_count=n)
  batch = next(it)   # image float32 [b, S, S, 3] in [-1, 1], text int32 [b, T, L],
                     # mask_loss float32 [b, T, L]; b = config.input.batch_size // n
  it.tf_iterator     # the tf.data iterator; saved with iterator_checkpoint.IteratorSave(it)

Eval (finite, in order, padded):
  ds = make_eval_dataset(config, tokenizer, process_index=i, process_count=n)
  for batch in ds.as_numpy_iterator(): ...   # + mask_valid float32 [b]: 1 real, 0 padding
  Every host yields the same number of batches (`int(ds.cardinality())`), and every example of
  the split appears exactly once with mask_valid 1 on exactly one host.

Each process reads its own disjoint part of the split (`tfds.split_for_jax_process`). The
stream is: read (fixed file order) -> repeat -> enumerate -> shuffle (seeded) -> map(decode,
preprocess, task rows) -> batch -> prefetch. All random draws in the map are stateless, seeded by
(config.seed, process_index, position in the stream), so the batches are a pure function of the
config and the process, and an iterator restored from a checkpoint continues the identical
sequence. The iterator uses `experimental_symbolic_checkpoint`: prefetch / map buffers are not
stored (they are recomputed exactly on restore); the shuffle buffer is.

Config fields read (config.input.*): data.name, data.split, data.data_dir (optional),
batch_size, image_size, resize ("squash" | "letterbox"), seq_len, tasks, prefixes (optional),
loss (optional), shuffle_buffer, tokenizer.{sp_model, box_codec, bins, box_order};
and config.seed.

Datasets: "locca_shapes/<config>" is prepared on the fly (`locca_shapes.prepare`); any other
name must already be prepared in data_dir and have the same features: `image`, `captions`
(Sequence(Text)), `objects` (Sequence of {bbox: BBoxFeature, refexp: Text}).
"""
import os

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from locca_jax import tokenizer as tokenizer_lib
from locca_jax.data import preprocess
from locca_jax.data import tasks as tasks_lib

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT_FIELDS = ("image", "text", "mask_loss")


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


def get_builder(config_data):
  """`config.input.data` (name, data_dir) -> a prepared TFDS builder."""
  name = config_data["name"]
  data_dir = _get(config_data, "data_dir", None)
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


def _process_split(builder, split, process_index, process_count):
  """This process's disjoint part of `split` and its number of examples."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
  if split not in builder.info.splits and "[" not in split and "+" not in split:
    raise ValueError(f"config.input.data.split={split!r} not in {builder.name} "
                     f"(available: {sorted(builder.info.splits.keys())})")
  sub = tfds.split_for_jax_process(split, process_index=process_index,
                                   process_count=process_count)
  return sub, builder.info.splits[sub].num_examples


def _read(builder, split):
  """Examples in a fixed order, image left encoded (decoded in the parallel map)."""
  return builder.as_dataset(
      split=split, shuffle_files=False,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False, add_tfds_id=False))


def _options():
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_symbolic_checkpoint = True
  # Exact resume needs the map to be a pure function of (position, example): its only stateful
  # ops are the SentencePiece op and the tokenizer's CheckNumerics, neither carries state that
  # changes results (tests/test_input_pipeline.py checks both facts).
  return options


def _process_fn(config, tokenizer, process_index, extra_fields=()):
  """(stream position, TFDS example) -> dict of model inputs (+ extra_fields)."""
  ci = config.input
  base_seed = tf.constant([int(config.seed), int(process_index)], tf.int64)

  @tf.autograph.experimental.do_not_convert  # Plain graph code; skips autograph's rewrite.
  def fn(index, example):
    seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    ex = preprocess.preprocess_example(example, int(ci.image_size), _get(ci, "resize", "squash"))
    rows = tasks_lib.make_task_sequences(ex, tokenizer, ci, seed)
    out = dict(image=ex["image"], text=rows["text"], mask_loss=rows["mask_loss"])
    for k in extra_fields:
      out[k] = rows[k] if k in rows else example[k]
    return out

  return fn


def _per_process_batch_size(batch_size, process_count, what="config.input.batch_size"):
  if batch_size % process_count:
    raise ValueError(f"{what}={batch_size} is not divisible by process_count={process_count} "
                     "(it is the global batch size, split evenly over processes)")
  return batch_size // process_count


def make_train_dataset(config, tokenizer, *, process_index=None, process_count=None,
                       extra_fields=()):
  """Infinite, shuffled, batched tf.data.Dataset of this process's part of the train split.

  Elements: dict(image float32 [b, S, S, 3], text int32 [b, T, L], mask_loss float32 [b, T, L])
  with b = config.input.batch_size // process_count; `extra_fields` adds fields of the task
  output ("truncated": int32 [b, T]) or top-level TFDS features (e.g. "image/id").
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ci = config.input
  local_batch = _per_process_batch_size(int(ci.batch_size), process_count)
  builder = get_builder(ci.data)
  split, n = _process_split(builder, ci.data["split"], process_index, process_count)
  if n == 0:
    raise ValueError(f"{builder.name} split {ci.data['split']!r} has no examples for process "
                     f"{process_index} of {process_count}")

  ds = _read(builder, split).repeat().enumerate()
  shuffle_buffer = int(_get(ci, "shuffle_buffer", 0) or 0)
  if shuffle_buffer > 1:
    ds = ds.shuffle(shuffle_buffer, seed=int(config.seed) * 1009 + process_index,
                    reshuffle_each_iteration=False)
  ds = ds.map(_process_fn(config, tokenizer, process_index, extra_fields),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options())


class InputIterator:
  """Iterates numpy batches of a tf.data.Dataset; `tf_iterator` holds the checkpointable state.

  Attributes: dataset, tf_iterator, process_index, process_count.
  """

  def __init__(self, dataset, process_index, process_count):
    self.dataset = dataset
    self.tf_iterator = iter(dataset)
    self.process_index = process_index
    self.process_count = process_count

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.tf_iterator)
    return tf.nest.map_structure(lambda t: t.numpy(), batch)

  @property
  def element_spec(self):
    return self.dataset.element_spec


def make_train_iterator(config, tokenizer, *, process_index=None, process_count=None,
                        extra_fields=()):
  """`make_train_dataset` wrapped in an InputIterator (numpy batches, saveable position)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ds = make_train_dataset(config, tokenizer, process_index=process_index,
                          process_count=process_count, extra_fields=extra_fields)
  return InputIterator(ds, process_index, process_count)


def make_eval_dataset(config, tokenizer, *, split=None, data=None, batch_size=None,
                      process_index=None, process_count=None, extra_fields=()):
  """Finite, ordered, padded tf.data.Dataset of this process's part of an eval split.

  Args:
    config: reads config.seed and config.input (preprocessing, tasks, seq_len, ...).
    tokenizer: tokenizer.Tokenizer.
    split: TFDS split (default config.input.data.split).
    data: overrides config.input.data (name, data_dir).
    batch_size: global batch size (default config.input.batch_size); divided by process_count.
    extra_fields: as in make_train_dataset (padding rows hold zeros / empty strings).

  Returns:
    tf.data.Dataset of dict(image, text, mask_loss, mask_valid float32 [b], *extra_fields),
    every batch of size b; all processes get the same number of batches (known cardinality).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  ci = config.input
  data = ci.data if data is None else data
  split = split or data["split"]
  local_batch = _per_process_batch_size(int(batch_size or ci.batch_size), process_count,
                                        "eval batch_size")
  builder = get_builder(data)
  own_split, _ = _process_split(builder, split, process_index, process_count)
  counts = [_process_split(builder, split, i, process_count)[1] for i in range(process_count)]
  num_batches = -(-max(counts) // local_batch)

  fn = _process_fn(config, tokenizer, process_index, extra_fields)

  @tf.autograph.experimental.do_not_convert
  def process(index, example):
    out = fn(index, example)
    out["mask_valid"] = tf.constant(1.0, tf.float32)
    return out

  ds = _read(builder, own_split).enumerate()
  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors(
      tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)).repeat()
  ds = ds.concatenate(padding).take(num_batches * local_batch)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options())
