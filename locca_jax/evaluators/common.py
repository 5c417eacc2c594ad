"""What the evaluators share: their context, eval inputs, the decoding loop, cross-host gathers.

b: per-process batch, S: image size, Lp: prompt width, Ld: decoded length, M: objects.

Eval inputs. Any one data spec of `locca_jax.data.sources` (TFDS: locca_shapes, coco,
coco_captions, ref_coco, ...; jsonl, coco_json, vg files), read as in
`input_pipeline.make_eval_dataset`: each process reads its own part (TFDS:
`tfds.split_for_jax_process`; files: record r on process r % n), records are cleaned without
skipping any (bad regions / captions dropped) and preprocessed exactly as in training
(`preprocess.preprocess_example`: resize, uint8 pixels, boxes in the model-input frame). An
element is one image (`examples(..., per_object=False)`) or one region of an image
(`per_object=True`: the image repeated for each of its regions). Batches are padded with
all-zero rows carrying `mask_valid` 0, and a process keeps yielding padding until every process
has run out (`batches`), so all processes run the same number of (collective) steps and every
example appears exactly once, with `mask_valid` 1, on exactly one process. `index` is the
record's position in the split (or file), the same whatever the number of processes.

Decoding runs on global batches (`sharding.global_batch`) over the training mesh; each process
gets back the rows of its own examples, drops the padding, and the per-example records of all
processes are gathered (`gather_records`) before any metric is computed.
"""
import dataclasses
import json
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from jax.sharding import Mesh
import tensorflow as tf

from locca_jax import sharding
from locca_jax.data import preprocess
from locca_jax.data import sources as sources_lib
from locca_jax.data import tasks as tasks_lib
from locca_jax.data.sources import common as source_common
from locca_jax.data.sources import tfds_sources


@dataclasses.dataclass(frozen=True)
class Context:
  """What every evaluator reads: the training config, the model and its params."""
  config: ml_collections.ConfigDict  # reads config.input.* (preprocessing, prefixes, seq_len)
  model: nn.Module
  params: Any
  tokenizer: Any  # locca_jax.tokenizer.Tokenizer
  mesh: Mesh


def _get(cfg, key, default=None):
  return default if cfg is None else cfg.get(key, default)


# ------------------------------------------------------------------------------ config
def eval_data(config: ml_collections.ConfigDict, name: str, eval_cfg) -> dict:
  """`config.evals.NAME.data` -> one validated data spec (see `locca_jax.data.sources`).

  A TFDS spec without `data_dir` takes config.input.data's (when that is a single TFDS spec).
  """
  data = _get(eval_cfg, "data", None)
  if not data:
    raise ValueError(f"config.evals.{name}.data: missing (expected one data spec, e.g. "
                     "dict(name='locca_shapes/base', split='validation'))")
  if isinstance(data, (list, tuple)):
    raise ValueError(f"config.evals.{name}.data: expected one data spec, got a list")
  data = sources_lib.as_dict(data)
  train_data = config.input.data
  if (data.get("source", "tfds") == "tfds" and data.get("data_dir") is None
      and hasattr(train_data, "get") and train_data.get("source", "tfds") == "tfds"):
    data["data_dir"] = train_data.get("data_dir")
  try:
    return sources_lib.specs_from_config(data)[0]
  except ValueError as e:
    raise ValueError(f"config.evals.{name}.data: {e}") from None


def max_examples(name: str, eval_cfg) -> int | None:
  n = _get(eval_cfg, "max_examples", None)
  if n is not None and (isinstance(n, bool) or int(n) < 1):
    raise ValueError(f"config.evals.{name}.max_examples={n!r}: expected >= 1 or None")
  return None if n is None else int(n)


def local_batch_size(config: ml_collections.ConfigDict, name: str, eval_cfg,
                     mesh: Mesh) -> int:
  """The per-process batch: `config.evals.NAME.batch_size` (global) / process_count."""
  batch_size = int(_get(eval_cfg, "batch_size", None) or config.input.batch_size)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards or batch_size % jax.process_count():
    raise ValueError(f"config.evals.{name}.batch_size={batch_size} must be divisible by the "
                     f"batch shards of the mesh (data x fsdp = {shards}) and by the number of "
                     f"processes ({jax.process_count()})")
  return batch_size // jax.process_count()


def decode_budget(config: ml_collections.ConfigDict, name: str, eval_cfg,
                  default: int) -> tuple[int, int]:
  """(prompt width Lp, decoded length Ld) with Lp + Ld = config.input.seq_len."""
  seq_len = int(config.input.seq_len)
  max_len = int(_get(eval_cfg, "max_len", None) or default)
  if not 0 < max_len < seq_len:
    raise ValueError(f"config.evals.{name}.max_len={max_len}: expected 0 < max_len < "
                     f"config.input.seq_len={seq_len} (prompt and answer share the decoder's "
                     "positions)")
  return seq_len - max_len, max_len


SEPARATOR = tasks_lib.SEPARATOR  # between the known and the decoded part (aref / gcap)


def prefix(config: ml_collections.ConfigDict, task: str) -> str:
  """The task prefix used in training (config.input.prefixes, else the default)."""
  prefixes = dict(tasks_lib.DEFAULT_PREFIXES)
  prefixes.update(dict(_get(config.input, "prefixes", None) or {}))
  return prefixes[task]


# ------------------------------------------------------------------------------ inputs
def examples(config: ml_collections.ConfigDict, spec: dict, *, per_object: bool,
             limit: int | None = None) -> tf.data.Dataset:
  """This process's preprocessed eval examples, in split order (unbatched, finite).

  `spec`: one data spec (`eval_data`); `limit`: keep the records with index < limit. Records
  go through the training path (source -> common layout -> `clean` without skipping records ->
  `preprocess_example`); the source's random draws (e.g. which of a RefCOCO object's
  expressions) are seeded by (config.seed, index), so they do not depend on the number of
  processes.
  Per image: image float32 [S, S, 3], index int64 (record position in the split, or in the
  file), image_id int64 (-1 if unknown), captions string [C], boxes float32 [M, 4], refexps
  string [M].
  Per object: image, index, image_id, object int32 (position among the image's usable
  regions), box float32 [4] (normalized yxyx of the model input), refexp string.
  """
  n, i = jax.process_count(), jax.process_index()
  spec = dict(spec)
  opts = source_common.CleanOptions.from_config(config.input, drop_records=False)
  if spec["source"] == "tfds":
    if limit is not None:
      spec["split"] = tfds_sources.head_split(spec, limit)
    src = sources_lib.make_source(spec, process_index=i, process_count=n, strict=opts.strict)
    offset = sum(tfds_sources.process_split(src.builder, spec["split"], k, n)[1]
                 for k in range(i))
    raw = src.dataset()
    to_index = lambda k: k + offset
  else:  # Files: record r goes to process r % n (as in make_eval_dataset).
    src = sources_lib.make_source(spec, process_index=0, process_count=1, strict=opts.strict)
    raw = src.dataset().shard(n, i)
    to_index = lambda k: k * n + i
  ci = config.input
  image_size, resize = int(ci.image_size), _get(ci, "resize", "squash")
  base_seed = tf.constant([int(config.seed), 0], tf.int64)

  @tf.autograph.experimental.do_not_convert
  def one_image(k, raw_example):
    index = to_index(k)
    ex = src.to_common(raw_example, tf.random.experimental.stateless_fold_in(base_seed, index),
                       index)
    crowd = ex["objects"].pop("crowd", None)
    ex, _, _ = source_common.clean(ex, opts, exclude=False, crowd=crowd)
    p = preprocess.preprocess_example(ex, image_size, resize)
    return dict(image=p["image"], index=index, image_id=tf.cast(ex["image/id"], tf.int64),
                captions=p["captions"], boxes=p["boxes"], refexps=p["refexps"])

  @tf.autograph.experimental.do_not_convert
  def objects(ex):
    objs = tf.data.Dataset.from_tensor_slices(dict(
        box=ex["boxes"], refexp=ex["refexps"],
        object=tf.range(tf.shape(ex["boxes"])[0], dtype=tf.int32)))
    return objs.map(lambda o: dict(image=ex["image"], index=ex["index"],
                                   image_id=ex["image_id"], object=o["object"],
                                   box=o["box"], refexp=o["refexp"]))

  ds = raw.enumerate()
  if limit is not None and spec["source"] != "tfds":
    ds = ds.filter(lambda k, _: to_index(k) < limit)
  ds = ds.map(one_image, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if per_object:
    ds = ds.flat_map(objects)
  return ds


def batches(ds: tf.data.Dataset, local_batch: int) -> Iterator[dict[str, np.ndarray]]:
  """Numpy batches of `ds` plus `mask_valid` float32 [b], padded with zero rows.

  Stops when no process has valid rows left, so every process yields the same number of
  batches (each step may be a collective over all devices).
  """
  ds = ds.map(lambda ex: dict(ex, mask_valid=tf.constant(1.0, tf.float32)))
  padding = tf.data.Dataset.from_tensors(tf.nest.map_structure(
      lambda s: tf.zeros([d or 0 for d in s.shape], s.dtype), ds.element_spec)).repeat()
  ds = ds.concatenate(padding).padded_batch(local_batch, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.prefetch(2).with_options(options)
  for batch in ds.as_numpy_iterator():
    if not any_process(bool(batch["mask_valid"].any())):
      return
    yield batch


# ------------------------------------------------------------------------------ processes
def any_process(flag: bool) -> bool:
  """True if `flag` is True on any process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.array([flag], np.int32)).max())


def gather_records(records: list[dict]) -> list[dict]:
  """All processes' JSON-serializable records, process 0's first (a collective)."""
  if jax.process_count() == 1:
    return list(records)
  data = np.frombuffer(json.dumps(records).encode("utf-8"), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int64)).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:data.size] = data
  gathered = multihost_utils.process_allgather(buf)  # [processes, max size]
  out = []
  for k, size in enumerate(sizes):
    out.extend(json.loads(bytes(gathered[k, :int(size)]).decode("utf-8")))
  return out


def local_rows(x, mesh: Mesh) -> np.ndarray:
  """This process's rows of a global batch-major result (the rows of its own inputs)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  batch_sh = sharding.batch_sharding(mesh)
  if not isinstance(x, jax.Array):
    x = jax.device_put(np.asarray(x), batch_sh)  # every process holds the same value
  elif x.sharding != batch_sh:
    x = jax.jit(lambda a: a, out_shardings=batch_sh)(x)
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, batch_sh.spec))


# ------------------------------------------------------------------------------ decoding
def prompt_array(prompts: list[list[int]], width: int,
                 describe: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray]:
  """Prompt ids -> (int32 [b, width] right-padded with 0, lengths int32 [b])."""
  out = np.zeros((len(prompts), width), np.int32)
  lens = np.zeros(len(prompts), np.int32)
  for i, ids in enumerate(prompts):
    if len(ids) > width:
      raise ValueError(f"{describe(i)}: prompt of {len(ids)} tokens exceeds the prompt width "
                       f"{width} (= config.input.seq_len - max_len; lower the evaluator's "
                       "max_len or raise seq_len)")
    out[i, :len(ids)] = ids
    lens[i] = len(ids)
  return out, lens


def decode_batches(ctx: Context, batches_iter: Iterator[dict[str, np.ndarray]],
                   make_prompts: Callable[[dict[str, np.ndarray]], list[list[int]]], *,
                   prompt_width: int, max_len: int, box_constraint=None
                   ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """Greedy-decodes every batch; yields (batch, continuations int32 [b, Ld]) per batch.

  Padding rows are decoded too (with their prompt) and left for the caller to drop via
  `batch["mask_valid"]`.
  """
  from locca_jax import decode as decode_lib  # pylint: disable=g-import-not-at-top
  for batch in batches_iter:
    prompts, lens = prompt_array(
        make_prompts(batch), prompt_width,
        lambda i, batch=batch: f"example index={int(batch['index'][i])}")
    glob = sharding.global_batch(dict(image=batch["image"], prompts=prompts, prompt_lens=lens),
                                 ctx.mesh)
    with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      out = decode_lib.decode(ctx.model, ctx.params, glob["image"], glob["prompts"],
                              glob["prompt_lens"], max_len=max_len,
                              eos_id=ctx.tokenizer.eos_id, method="greedy",
                              box_constraint=box_constraint)
    yield batch, local_rows(out, ctx.mesh)


def text(value) -> str:
  """A tf.data string (bytes) as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
