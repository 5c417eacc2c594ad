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


def _fit(ids, mask, seq_len, pad_id):
  """Truncates / pads one row to seq_len. Returns (ids [L], mask [L], truncated int32)."""
  n = tf.shape(ids)[0]
  truncated = tf.cast(n > seq_len, tf.int32)
  ids, mask = ids[:seq_len], mask[:seq_len]
  pad = seq_len - tf.shape(ids)[0]
  ids = tf.pad(ids, [[0, pad]], constant_values=pad_id)
  mask = tf.pad(mask, [[0, pad]])
  return tf.ensure_shape(ids, [seq_len]), tf.ensure_shape(mask, [seq_len]), truncated


def _row(pieces, parts, flags, eos_id):
  """Concatenates piece ids (dict part -> int32 [n]) with eos; builds the matching mask."""
  ids, mask = [], []
  for part in parts:
    piece = tf.constant([eos_id], tf.int32) if part == "eos" else pieces[part]
    ids.append(piece)
    mask.append(tf.fill(tf.shape(piece), 1.0 if flags[part] else 0.0))
  return tf.concat(ids, 0), tf.concat(mask, 0)


def make_task_sequences(example, tokenizer, config_input, seed):
  """Builds the task rows of one example.

  Args:
    example: dict with `captions` string [C], `boxes` float [N, 4] (normalized yxyx of the model
      input image) and `refexps` string [N] (e.g. `preprocess.preprocess_example` output).
    tokenizer: `locca_jax.tokenizer.Tokenizer` (in-graph `tokenize`, `box_to_tokens`, `pad_id`,
      `eos_id`).
    config_input: reads `tasks`, `seq_len`, `prefixes` (optional), `loss` (optional).
    seed: int [2] stateless seed of this example.

  Returns:
    dict(text=int32 [T, L], mask_loss=float32 [T, L], truncated=int32 [T]); row t is task
    `config_input.tasks[t]`.
  """
  tasks = tuple(config_input.tasks)
  if not tasks:
    raise ValueError("config.input.tasks is empty (expected a subset of ('cap', 'aref', 'gcap'))")
  seq_len = int(config_input.seq_len)
  prefixes = dict(DEFAULT_PREFIXES)
  prefixes.update(dict(_get(config_input, "prefixes", None) or {}))
  pad_id, eos_id = int(tokenizer.pad_id), int(tokenizer.eos_id)

  captions = tf.reshape(example["captions"], [-1])
  boxes = tf.reshape(tf.cast(example["boxes"], tf.float32), [-1, 4])
  refexps = tf.reshape(example["refexps"], [-1])
  num_caps = tf.shape(captions)[0]
  num_objs = tf.shape(boxes)[0]
  # Pad with one dummy so that index 0 is valid; rows of empty examples are blanked below.
  captions_safe = tf.concat([captions, [""]], 0)
  boxes_safe = tf.concat([boxes, tf.fill([1, 4], 0.5)], 0)
  refexps_safe = tf.concat([refexps, [""]], 0)

  flags = [loss_flags(config_input, task) for task in tasks]  # Validates the tasks too.
  # Draw first, then tokenize every string of the example in one call (and every box in one).
  seeds = task_seeds(seed, len(tasks))
  texts_in, boxes_in, available = [], [], []
  for t, task in enumerate(tasks):
    if task == "cap":
      texts_in.append(tf.gather(captions_safe, _sample_index(num_caps, seeds[t])))
      available.append(num_caps > 0)
    else:
      k = _sample_index(num_objs, seeds[t])
      texts_in.append(tf.gather(refexps_safe, k))
      boxes_in.append(tf.gather(boxes_safe, k))
      available.append(num_objs > 0)
  strings = [prefixes[task] for task in tasks] + [SEPARATOR]
  tok = tokenizer.tokenize(tf.stack([tf.constant(s) for s in strings] + texts_in))
  box_tok = tokenizer.box_to_tokens(tf.stack(boxes_in)) if boxes_in else None
  piece = lambda ragged, i: tf.cast(ragged.values[ragged.row_splits[i]:ragged.row_splits[i + 1]],
                                    tf.int32)
  sep = piece(tok, len(tasks))

  out_text, out_mask, out_trunc = [], [], []
  num_boxes = 0
  for t, task in enumerate(tasks):
    pieces = dict(prefix=piece(tok, t), caption=piece(tok, len(tasks) + 1 + t), sep=sep)
    if task != "cap":
      pieces["box"] = piece(box_tok, num_boxes)
      num_boxes += 1
    ids, mask = _row(pieces, PARTS[task], flags[t], eos_id)
    ids, mask, trunc = _fit(ids, mask, seq_len, pad_id)
    keep = tf.cast(available[t], tf.int32)
    out_text.append(ids * keep + pad_id * (1 - keep))
    out_mask.append(mask * tf.cast(keep, tf.float32))
    out_trunc.append(trunc * keep)
  return dict(text=tf.stack(out_text), mask_loss=tf.stack(out_mask),
              truncated=tf.stack(out_trunc))
