"""`zeroshot`: classification by the likelihood of each class's caption (CapPa-style scoring).

b: per-process batch, C: classes, Cc: classes per decoder call (`class_chunk`), L: the longest
class row, P: visual tokens, F: decoder width.

For every image and every class c the Cap row `cap: <template.format(class_names[c])> <eos>`
(prefix from config.input.prefixes; each piece tokenized on its own, as `data/tasks.py` builds
the rows) is teacher-forced through the decoder. The score of class c is the TOTAL
log-likelihood of the caption tokens and the eos: the sum of log p over every token after the
prefix (the tokens a Cap row trains), not a per-token mean, so a class name is scored as the
complete caption `template.format(name)`, ended where the template ends. The prediction is the
class with the highest score (ties: the lowest class index); top-5 ranks by score the same way.

Efficiency: each image is encoded once (`likelihood.encode`); its C rows run through the
decoder as the task axis ([b, Cc, L] per call, L cut to the longest class row) against the same
visual tokens, in chunks of `class_chunk` classes (the last chunk padded with zero-weight rows,
so every call has one shape and compiles once).

Labels (`label_key`):
  a ClassLabel feature of a TFDS dataset (default "label": cifar10, imagenet2012, ...): class
    names are `builder.info.features[label_key].names`, unless `class_names` (the same number)
    replaces them (e.g. readable names for WordNet ids). The `image` feature is decoded and
    preprocessed as in training (resize to config.input.image_size, uint8 pixels).
  "num_objects": the number of regions of the image (as the other evaluators read them:
    `common.examples`, after cleaning), for any data spec; class i means "i regions", so
    `class_names` is required, one name per count 0, 1, ..., C-1 (an image with C or more
    regions is an error). configs/locca_b16.py runs it on locca_shapes (2 to 5 shapes per
    image) with template "{} shapes" and class_names zero ... five: counting is a per-image
    property that the dataset stores (its objects; it has no image-level label) and that its
    captions put in words ("three shapes on a gray background: ...").

Metrics: `acc` (top-1), `acc_top5` (the label among the 5 best; only with >= 5 classes),
`num_examples`.

Config (config.evals.NAME): type="zeroshot", data (one data spec of `locca_jax.data.sources`;
a TFDS spec unless label_key="num_objects"), batch_size, max_examples (first N records),
label_key (default "label"), template (default "{}", e.g. "a photo of a {}"; exactly one "{}"),
class_names (optional, required for num_objects), class_chunk (default 32), log_steps.
"""
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from locca_jax import sharding
from locca_jax.data import preprocess
from locca_jax.data.sources import tfds_sources
from locca_jax.evaluators import common
from locca_jax.evaluators import likelihood

NUM_OBJECTS = "num_objects"
DEFAULT_CHUNK = 32
TOP_K = 5


def options(name: str, cfg) -> dict:
  """The validated zeroshot fields of `config.evals.NAME` (reads no data)."""
  where = f"config.evals.{name}"
  label_key = cfg.get("label_key", "label")
  if not isinstance(label_key, str) or not label_key:
    raise ValueError(f"{where}.label_key={label_key!r}: expected the name of a ClassLabel "
                     f"feature (e.g. 'label') or {NUM_OBJECTS!r}")
  template = cfg.get("template", "{}")
  ok = isinstance(template, str) and template.count("{}") == 1
  try:
    ok = ok and bool(template.format("x").strip())
  except (IndexError, KeyError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{where}.template={template!r}: expected a text with exactly one '{{}}' "
                     "for the class name and no other braces, e.g. 'a photo of a {}'")
  names = cfg.get("class_names", None)
  if names is not None:
    if isinstance(names, str) or not all(isinstance(n, str) and n.strip() for n in names):
      raise ValueError(f"{where}.class_names={names!r}: expected a list of non-empty strings")
    names = list(names)
    dup = sorted({n for n in names if names.count(n) > 1})
    if not names or dup:
      raise ValueError(f"{where}.class_names: expected distinct names (at least one), got "
                       f"{len(names)} names, duplicates {dup[:5]}")
  if label_key == NUM_OBJECTS and names is None:
    raise ValueError(f"{where}.class_names: required with label_key={NUM_OBJECTS!r} (one name "
                     "per region count 0, 1, 2, ..., e.g. ('zero', 'one', 'two', 'three'))")
  chunk = cfg.get("class_chunk", DEFAULT_CHUNK)
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"{where}.class_chunk={chunk!r}: expected a positive number of classes "
                     "per decoder call")
  return dict(label_key=label_key, template=template, class_names=names, class_chunk=chunk)


def class_rows(tokenizer, config, texts: list[str], where: str
               ) -> tuple[np.ndarray, np.ndarray]:
  """Cap rows of the class texts: (ids int32 [C, L], weights float32 [C, L]).

  Row c = prefix ids + ids of texts[c] + eos, right-padded with 0 to the longest row L; weight
  1 on the text and the eos, 0 on the prefix and the padding.
  """
  head = tokenizer.encode(common.prefix(config, "cap"))
  seq_len = int(config.input.seq_len)
  bodies = []
  for c, text in enumerate(texts):
    ids = tokenizer.encode(text) + [int(tokenizer.eos_id)]
    if len(head) + len(ids) > seq_len:
      raise ValueError(f"{where}: class {c} caption {text!r} takes {len(head) + len(ids)} "
                       f"tokens with prefix and eos > config.input.seq_len={seq_len}")
    bodies.append(ids)
  width = len(head) + max(len(b) for b in bodies)
  rows = np.zeros((len(texts), width), np.int32)
  weights = np.zeros((len(texts), width), np.float32)
  for c, ids in enumerate(bodies):
    rows[c, :len(head) + len(ids)] = head + ids
    weights[c, len(head):len(head) + len(ids)] = 1.0
  return rows, weights


def labelled_examples(config, name: str, spec: dict, label_key: str, limit: int | None
                      ) -> tuple[tf.data.Dataset, list[str] | None]:
  """(this process's examples {image, index, image_id, label int64}, the builder's class names
  or None for num_objects), in split order."""
  if label_key == NUM_OBJECTS:
    ds = common.examples(config, spec, per_object=False, limit=limit)
    return ds.map(lambda ex: dict(image=ex["image"], index=ex["index"], image_id=ex["image_id"],
                                  label=tf.cast(tf.shape(ex["boxes"])[0], tf.int64))), None
  where = f"config.evals.{name}"
  if spec["source"] != "tfds":
    raise ValueError(f"{where}.label_key={label_key!r} reads a ClassLabel feature of a TFDS "
                     f"dataset, got data source={spec['source']!r} (use label_key="
                     f"{NUM_OBJECTS!r} to classify region counts of any source)")
  builder = tfds_sources.get_builder(spec)
  features = builder.info.features
  labels = sorted(k for k in features.keys()
                  if isinstance(features[k], tfds.features.ClassLabel))
  if label_key not in labels or "image" not in features.keys():
    raise ValueError(f"{where}.label_key={label_key!r}: {builder.name} needs an `image` feature "
                     f"and a ClassLabel feature {label_key!r} (has {sorted(features.keys())}; "
                     f"ClassLabel features: {labels}; or label_key={NUM_OBJECTS!r})")
  n, i = jax.process_count(), jax.process_index()
  split = spec["split"]
  if limit is not None:
    if "[" in split or "+" in split:
      raise ValueError(f"{where}.max_examples={limit} needs a plain split name, got "
                       f"split={split!r} (slice the split or drop max_examples)")
    split = f"{split}[:{limit}]"
  sub, _ = tfds_sources.process_split(builder, split, i, n)
  offset = sum(tfds_sources.process_split(builder, split, k, n)[1] for k in range(i))
  wanted = {"image": True, label_key: True}
  has_id = ("image/id" in features.keys()
            and np.issubdtype(getattr(features["image/id"], "np_dtype", np.str_), np.integer))
  if has_id:
    wanted["image/id"] = True
  raw = tfds_sources.read(builder, sub, tfds.decode.PartialDecoding(
      wanted, decoders={"image": tfds.decode.SkipDecoding()}))
  ci = config.input
  image_size, resize = int(ci.image_size), ci.get("resize", "squash")

  @tf.autograph.experimental.do_not_convert
  def one(k, ex):
    image = preprocess.preprocess_example(dict(image=ex["image"]), image_size, resize)["image"]
    image_id = tf.cast(ex["image/id"], tf.int64) if has_id else tf.constant(-1, tf.int64)
    return dict(image=image, index=k + offset, image_id=image_id,
                label=tf.cast(ex[label_key], tf.int64))

  ds = raw.enumerate().map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds, list(features[label_key].names)


def evaluate(ctx: common.Context, name: str, cfg) -> tuple[dict[str, float], list[dict]]:
  """Returns ({"acc", "acc_top5" (>= 5 classes), "num_examples"}, per-image records)."""
  where = f"config.evals.{name}"
  opts = options(name, cfg)
  data = common.eval_data(ctx.config, name, cfg)
  ds, names = labelled_examples(ctx.config, name, data, opts["label_key"],
                                common.max_examples(name, cfg))
  if opts["class_names"] is not None:
    if names is not None and len(names) != len(opts["class_names"]):
      raise ValueError(f"{where}.class_names: {len(opts['class_names'])} names for the "
                       f"{len(names)} classes of {data['name']} feature {opts['label_key']!r}")
    names = opts["class_names"]
  rows, weights = class_rows(ctx.tokenizer, ctx.config,
                             [opts["template"].format(n) for n in names], where)
  num_classes = len(names)
  chunk = min(opts["class_chunk"], num_classes)
  pad = -num_classes % chunk  # zero-weight rows: every decoder call has the shape [b, Cc, L]
  rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), np.int32)])
  weights = np.concatenate([weights, np.zeros((pad, rows.shape[1]), np.float32)])
  local = common.local_batch_size(ctx.config, name, cfg, ctx.mesh)
  records = []
  for batch in common.batches(ds, local):
    image = sharding.global_batch(dict(image=batch["image"]), ctx.mesh)["image"]
    visual = likelihood.encode(ctx.model, ctx.mesh, ctx.params, image)  # once per image
    scores = np.concatenate([common.local_rows(likelihood.row_log_likelihoods(
        ctx.model, ctx.mesh, ctx.params, visual, rows[s:s + chunk], weights[s:s + chunk]),
                                               ctx.mesh)
                             for s in range(0, len(rows), chunk)], axis=1)[:, :num_classes]
    for i in np.flatnonzero(batch["mask_valid"] > 0):
      order = np.argsort(-scores[i], kind="stable")[:TOP_K]  # ties: lower class index first
      label = int(batch["label"][i])
      records.append(dict(
          index=int(batch["index"][i]), image_id=int(batch["image_id"][i]), label=label,
          top5=[int(c) for c in order], top5_scores=[float(scores[i, c]) for c in order],
          label_score=float(scores[i, label]) if 0 <= label < num_classes else None))
  records = sorted(common.gather_records(records), key=lambda r: r["index"])
  bad = [r for r in records if not 0 <= r["label"] < num_classes]
  if bad:  # Checked after the gather, so that every process raises (no collective left hanging).
    raise ValueError(f"{where}: example index={bad[0]['index']} has label {bad[0]['label']} "
                     f"outside the {num_classes} classes of class_names / the ClassLabel "
                     f"(label_key={opts['label_key']!r}; {len(bad)} such examples)")
  return score(records, names)


def score(records: list[dict], names: list[str]) -> tuple[dict[str, float], list[dict]]:
  """Metrics of records holding `label` and `top5` (class ids, best first).

  Adds `label_name`, `prediction` (= top5[0]), `prediction_name`, `correct`.
  """
  n = max(len(records), 1)
  metrics = dict(acc=sum(r["top5"][0] == r["label"] for r in records) / n)
  if len(names) >= TOP_K:
    metrics["acc_top5"] = sum(r["label"] in r["top5"][:TOP_K] for r in records) / n
  metrics["num_examples"] = len(records)
  out = [dict(r, label_name=names[r["label"]], prediction=r["top5"][0],
              prediction_name=names[r["top5"][0]], correct=r["top5"][0] == r["label"])
         for r in records]
  return metrics, out
