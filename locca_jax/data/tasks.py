"""LocCa task sequences (tf, in-graph): one row of token ids + loss mask per task, per image.

Row layouts (each piece tokenized on its own, ids concatenated):
  cap:   [prefix "cap:"]  [caption]            [eos]
  aref:  [prefix "aref:"] [refexp] [":"] [box] [eos]
  gcap:  [prefix "gcap:"] [box] [":"] [refexp] [eos]
Loss flags per task and part come from `config_input.loss` (e.g. `aref=dict(prefix=False,
caption=True, box=True)`; a flag not given is True, except `prefix`, which is False). The ":"
separator carries the flag of the part before it; eos carries the flag of the part it ends (the
last part of the row: caption for cap/gcap, box for aref).

Truncation: a row longer than `seq_len` is cut to its first `seq_len` tokens, and its eos is
dropped with the rest: a cut target has no end, so the model is never taught to stop there.
`truncated` counts these rows (the shipped `locca_shapes` data fits in seq_len 48 untruncated).

Sampling: the caption is one of `captions`; aref and gcap each sample ONE object independently.
All draws are stateless (`tf.random.stateless_*`) from the per-example `seed`, so a given
example always yields the same rows, whatever the shuffling, parallelism or restarts.
An image without objects (or without captions) gets all-pad rows with zero loss mask for
aref/gcap (cap).

Two steps, so that the costly part runs once per batch: `sample_task_inputs` (per example, in
the pipeline's per-example map: the draws; fixed-shape strings and boxes) and `build_task_rows`
(after batching: one tokenizer call for all strings of the batch, one for all boxes, ragged row
assembly). `make_task_sequences` chains both for one example.

T: number of tasks (rows), L: seq_len.
"""
import tensorflow as tf

TASKS = ("cap", "aref", "gcap")
DEFAULT_PREFIXES = dict(cap="cap:", aref="aref:", gcap="gcap:")
SEPARATOR = ":"
# Parts of each task's row, in order; "sep" and "eos" take their flag from a neighbour.
PARTS = dict(
    cap=("prefix", "caption", "eos"),
    aref=("prefix", "caption", "sep", "box", "eos"),
    gcap=("prefix", "box", "sep", "caption", "eos"),
)
_PART_FLAGS = dict(cap=("prefix", "caption"), aref=("prefix", "caption", "box"),
                   gcap=("prefix", "box", "caption"))


def _get(cfg, key, default=None):
  """`cfg.get(key, default)` for dicts and ConfigDicts (and None)."""
  if cfg is None:
    return default
  return cfg.get(key, default)


def loss_flags(config_input, task):
  """{part: bool} for the parts of `task`'s row, incl. "sep" and "eos"."""
  if task not in TASKS:
    raise ValueError(f"config.input.tasks: unknown task {task!r} (expected a subset of {TASKS})")
  cfg = _get(_get(config_input, "loss"), task)
  if cfg is not None:
    unknown = set(cfg.keys()) - set(_PART_FLAGS[task])
    if unknown:
      raise ValueError(f"config.input.loss.{task}: unknown parts {sorted(unknown)} "
                       f"(expected some of {_PART_FLAGS[task]})")
  flags = {p: bool(_get(cfg, p, p != "prefix")) for p in _PART_FLAGS[task]}
  parts = PARTS[task]
  flags["sep"] = flags[parts[parts.index("sep") - 1]] if "sep" in parts else False
  flags["eos"] = flags[parts[-2]]
  return flags


def task_seeds(seed, num_tasks):
  """Independent stateless seeds [num_tasks, 2] from one example seed [2]."""
  return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num_tasks)


def _sample_index(n, seed):
  """Uniform int in [0, n) (0 if n == 0), stateless."""
  return tf.random.stateless_uniform([], seed=seed, minval=0, maxval=tf.maximum(n, 1),
                                     dtype=tf.int32)


def sample_task_inputs(example, config_input, seed):
  """Draws what each task row of one example holds (per example, before batching).

  Args:
    example: dict with `captions` string [C], `boxes` float [N, 4] (normalized yxyx of the model
      input image) and `refexps` string [N] (e.g. `preprocess.preprocess_example` output).
    config_input: reads `tasks`.
    seed: int [2] stateless seed of this example.

  Returns:
    dict(task_text string [T]: the caption (cap) or region text (aref, gcap) of row t,
         task_box float32 [T, 4]: the region's box (0.5 for cap rows),
         task_available bool [T]: False when the example has no caption (cap) / no region).
  """
  tasks = tuple(config_input.tasks)
  if not tasks:
    raise ValueError("config.input.tasks is empty (expected a subset of ('cap', 'aref', 'gcap'))")
  for task in tasks:
    if task not in TASKS:
      raise ValueError(f"config.input.tasks: unknown task {task!r} (expected a subset of "
                       f"{TASKS})")
  captions = tf.reshape(example["captions"], [-1])
  boxes = tf.reshape(tf.cast(example["boxes"], tf.float32), [-1, 4])
  refexps = tf.reshape(example["refexps"], [-1])
  num_caps = tf.shape(captions)[0]
  num_objs = tf.shape(boxes)[0]
  # Pad with one dummy so that index 0 is valid; rows of empty examples are blanked later.
  captions_safe = tf.concat([captions, [""]], 0)
  boxes_safe = tf.concat([boxes, tf.fill([1, 4], 0.5)], 0)
  refexps_safe = tf.concat([refexps, [""]], 0)
  seeds = task_seeds(seed, len(tasks))
  texts, task_boxes, available = [], [], []
  for t, task in enumerate(tasks):
    if task == "cap":
      texts.append(tf.gather(captions_safe, _sample_index(num_caps, seeds[t])))
      task_boxes.append(tf.fill([4], 0.5))
      available.append(num_caps > 0)
    else:
      k = _sample_index(num_objs, seeds[t])
      texts.append(tf.gather(refexps_safe, k))
      task_boxes.append(tf.gather(boxes_safe, k))
      available.append(num_objs > 0)
  return dict(task_text=tf.stack(texts), task_box=tf.stack(task_boxes),
              task_available=tf.stack(available))


TASK_INPUTS = ("task_text", "task_box", "task_available")


def build_task_rows(inputs, tokenizer, config_input):
  """Tokenizes and lays out the rows of a batch of examples (after batching: vectorized).

  Args:
    inputs: `sample_task_inputs` output with a leading batch dimension B.
    tokenizer: `locca_jax.tokenizer.Tokenizer` (in-graph `tokenize`, `box_to_tokens`, `pad_id`,
      `eos_id`).
    config_input: reads `tasks`, `seq_len`, `prefixes` (optional), `loss` (optional).

  Returns:
    dict(text=int32 [B, T, L], mask_loss=float32 [B, T, L], truncated=int32 [B, T]); row t is
    task `config_input.tasks[t]`.
  """
  tasks = tuple(config_input.tasks)
  seq_len = int(config_input.seq_len)
  prefixes = dict(DEFAULT_PREFIXES)
  prefixes.update(dict(_get(config_input, "prefixes", None) or {}))
  pad_id, eos_id = int(tokenizer.pad_id), int(tokenizer.eos_id)
  flags = [loss_flags(config_input, task) for task in tasks]  # Validates the tasks too.

  texts = tf.reshape(inputs["task_text"], [-1, len(tasks)])
  batch = tf.shape(texts)[0]
  box_tasks = [t for t, task in enumerate(tasks) if task != "cap"]
  # Every string of the batch in one tokenizer call, every box in one.
  constants = tokenizer.tokenize(tf.constant([prefixes[task] for task in tasks] + [SEPARATOR]))
  words = tokenizer.tokenize(tf.reshape(texts, [-1]))               # [B * T, None]
  if box_tasks:
    boxes = tf.gather(tf.reshape(tf.cast(inputs["task_box"], tf.float32), [-1, len(tasks), 4]),
                      box_tasks, axis=1)
    box_ids = tokenizer.box_to_tokens(tf.reshape(boxes, [-1, 4]))   # [B * len(box_tasks), None]
  rows_of = lambda ragged, i, stride: tf.gather(ragged, tf.range(batch) * stride + i)

  def constant_piece(ids):   # int32 [n] -> the same n ids for every example, ragged [B, n]
    return tf.RaggedTensor.from_tensor(tf.tile(tf.cast(ids, tf.int32)[None], [batch, 1]))

  sep = constant_piece(constants[len(tasks)])
  eos = constant_piece(tf.constant([eos_id], tf.int32))
  available = tf.reshape(tf.cast(inputs["task_available"], tf.bool), [-1, len(tasks)])
  out_text, out_mask, out_trunc = [], [], []
  for t, task in enumerate(tasks):
    pieces = dict(prefix=constant_piece(constants[t]),
                  caption=tf.cast(rows_of(words, t, len(tasks)), tf.int32), sep=sep, eos=eos)
    if task != "cap":
      pieces["box"] = tf.cast(rows_of(box_ids, box_tasks.index(t), len(box_tasks)), tf.int32)
    parts = [pieces[part] for part in PARTS[task]]
    ids = tf.concat(parts, axis=1)
    mask = tf.concat([p.with_values(tf.fill(tf.shape(p.values), 1.0 if flags[t][part] else 0.0))
                      for part, p in zip(PARTS[task], parts)], axis=1)
    keep = available[:, t]
    # A row longer than seq_len is cut (its eos with it); shorter rows are padded.
    dense_ids = ids.to_tensor(default_value=pad_id, shape=[None, seq_len])
    dense_mask = mask.to_tensor(default_value=0.0, shape=[None, seq_len])
    out_text.append(tf.where(keep[:, None], dense_ids, pad_id))
    out_mask.append(dense_mask * tf.cast(keep, tf.float32)[:, None])
    out_trunc.append(tf.cast((ids.row_lengths() > seq_len) & keep, tf.int32))
  out = dict(text=tf.stack(out_text, 1), mask_loss=tf.stack(out_mask, 1),
             truncated=tf.stack(out_trunc, 1))
  static_batch = inputs["task_text"].shape[0] if inputs["task_text"].shape.rank else None
  for k, v in out.items():
    v.set_shape([static_batch, len(tasks)] + ([seq_len] if k != "truncated" else []))
  return out


def make_task_sequences(example, tokenizer, config_input, seed):
  """Builds the task rows of one example: `build_task_rows` of `sample_task_inputs`.

  Args:
    example: dict with `captions` string [C], `boxes` float [N, 4] (normalized yxyx of the model
      input image) and `refexps` string [N] (e.g. `preprocess.preprocess_example` output).
    tokenizer: `locca_jax.tokenizer.Tokenizer`.
    config_input: reads `tasks`, `seq_len`, `prefixes` (optional), `loss` (optional).
    seed: int [2] stateless seed of this example.

  Returns:
    dict(text=int32 [T, L], mask_loss=float32 [T, L], truncated=int32 [T]); row t is task
    `config_input.tasks[t]`.
  """
  inputs = sample_task_inputs(example, config_input, seed)
  rows = build_task_rows({k: v[None] for k, v in inputs.items()}, tokenizer, config_input)
  seq_len = int(config_input.seq_len)
  num_tasks = len(tuple(config_input.tasks))
  return dict(text=tf.ensure_shape(rows["text"][0], [num_tasks, seq_len]),
              mask_loss=tf.ensure_shape(rows["mask_loss"][0], [num_tasks, seq_len]),
              truncated=rows["truncated"][0])
