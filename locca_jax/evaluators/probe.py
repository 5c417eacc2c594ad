"""`probe`: a linear probe on frozen, mean-pooled encoder features (a holistic encoder check).

What it measures: how linearly readable per-image scene attributes are from the encoder alone
(no decoder): for `locca_shapes`, which colours, kinds and sizes of shape the image contains,
which (colour, kind) combinations (the binding of a colour to a kind), and how many objects.

Features: the encoder's output tokens (`img/`, after its final LayerNorm, before `img_proj`)
averaged over the P visual tokens -> one float vector [E] per image, computed exactly as the
evaluators preprocess images (`common.examples`).

Labels (per image, from the split's TFDS ClassLabel features under `objects/`):
  presence labels: for each feature f in `labels` (default color, shape, size) and each class
    c of f, "some object has f == c"; for each pair (f, g) in `pairs` (default (color,
    shape)), "some object has f == c and g == d". locca_shapes: 6 + 6 + 2 + 36 = 50 labels.
  count: the number of objects (2-5 in locca_shapes), one class per value seen in training.

Probe: closed-form ridge regression (as big_vision's few-shot linear evaluation does), in
float64 numpy. Features are standardized with the training split's mean / std; targets are
+1 / -1 (presence: one column per label; count: one-vs-rest columns, prediction = argmax);
W = (X^T X + l2 * n I)^-1 X^T Y on centred X and Y, the bias is the targets' training mean.
The l2 strength is chosen from `l2_grid` by the mean AP (presence) / accuracy (count) on
`select_split`, fit on `train_split` only, and the chosen fit is scored on `data` (the test
split). Nothing is tuned on the scored split.

Metrics:
  map: mean average precision over the presence labels that have both positives and negatives
    in the scored split; map_<f> / map_<f>_<g>: the same over one feature's / pair's labels.
    AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds (ties are one
    threshold), i.e. the area under the step precision-recall curve.
  map_chance: the mean prevalence of the same labels (the expected AP of random scores).
  count_acc: accuracy of the predicted object count; count_majority: accuracy of always
    predicting the training split's most frequent count.
  l2, count_l2: the chosen strengths; num_train, num_select, num_examples, num_labels.

Config (`dict(type="probe", ...)`): data (one TFDS data spec: the scored split, e.g.
dict(name="locca_shapes/base", split="test")), train_split ("train"), select_split
("validation"), train_examples / select_examples / max_examples (first N records of each
split; None: all), labels, pairs, l2_grid, batch_size.

The study (`locca_jax.study`) runs it on each pretrained checkpoint; it has the evaluator
signature `evaluate(ctx, name, cfg) -> (metrics, records)` of `locca_jax.evaluators`.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from locca_jax import sharding
from locca_jax.data import locca_shapes  # pylint: disable=unused-import  (registers the builder)
from locca_jax.evaluators import common

DEFAULT_LABELS = ("color", "shape", "size")
DEFAULT_PAIRS = (("color", "shape"),)
DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def evaluate(ctx: common.Context, name: str, cfg) -> tuple[dict[str, float], list[dict]]:
  """Returns ({"map", "map_<f>", "count_acc", ...}, per-test-image records)."""
  test_spec = common.eval_data(ctx.config, name, cfg)
  if test_spec["source"] != "tfds":
    raise ValueError(f"config.evals.{name}.data: the probe reads its labels from TFDS "
                     f"ClassLabel features, got source={test_spec['source']!r} (expected a "
                     "TFDS spec such as dict(name='locca_shapes/base', split='test'))")
  label_names = tuple(cfg.get("labels", DEFAULT_LABELS))
  if not label_names:
    raise ValueError(f"config.evals.{name}.labels: empty (expected object ClassLabel names, "
                     f"e.g. {DEFAULT_LABELS})")
  pairs = tuple(tuple(p) for p in cfg.get("pairs", DEFAULT_PAIRS))
  grid = tuple(float(v) for v in cfg.get("l2_grid", DEFAULT_L2_GRID))
  if not grid or min(grid) <= 0:
    raise ValueError(f"config.evals.{name}.l2_grid={grid}: expected positive strengths")
  builder = tfds.builder(test_spec["name"], data_dir=test_spec.get("data_dir"))
  classes = class_names(builder, name, label_names)
  for pair in pairs:
    if len(pair) != 2 or not set(pair) <= set(label_names):
      raise ValueError(f"config.evals.{name}.pairs: {pair!r} (expected two names of "
                       f"labels={label_names})")
  roles = (("train", cfg.get("train_split", "train"), cfg.get("train_examples")),
           ("select", cfg.get("select_split", "validation"), cfg.get("select_examples")),
           ("test", test_spec["split"], cfg.get("max_examples")))
  data = {}
  for role, split, limit in roles:
    spec = dict(test_spec, split=split)
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
      raise ValueError(f"config.evals.{name}: {role} examples={limit!r}: expected >= 1 or None")
    feats, ids, indices = features(ctx, name, cfg, spec, None if limit is None else int(limit))
    objects = object_labels(builder, split, None if limit is None else int(limit), label_names)
    missing = [int(i) for i in ids if int(i) not in objects]
    if missing:
      raise ValueError(f"config.evals.{name}: split {split!r} has no labels for image/id "
                       f"{missing[:5]} (expected every image of the split in its TFDS labels)")
    data[role] = dict(x=feats, ids=ids, index=indices, objects=[objects[int(i)] for i in ids])

  columns = presence_columns(classes, pairs)
  y = {role: presence_targets(d["objects"], columns) for role, d in data.items()}
  x_train, x_select, x_test = standardize(data["train"]["x"], data["select"]["x"],
                                          data["test"]["x"])
  # Presence labels: l2 by the mean AP on the selection split.
  best = max(grid, key=lambda l2: _mean_ap(ridge_predict(x_train, y["train"], x_select, l2),
                                           y["select"])[0])
  scores = ridge_predict(x_train, y["train"], x_test, best)
  metrics = {"l2": best}
  metrics["map"], metrics["map_chance"] = _mean_ap(scores, y["test"])
  for group in list(label_names) + ["_".join(p) for p in pairs]:
    cols = [k for k, c in enumerate(columns) if c[0] == group]
    metrics[f"map_{group}"] = _mean_ap(scores[:, cols], y["test"][:, cols])[0]

  # Object count: one-vs-rest over the counts seen in training, l2 by selection accuracy.
  counts = {role: np.asarray([len(o[label_names[0]]) for o in d["objects"]])
            for role, d in data.items()}
  values = np.unique(counts["train"])
  onehot = lambda c: np.where(c[:, None] == values[None, :], 1.0, -1.0)
  predict = lambda x, l2: values[np.argmax(ridge_predict(x_train, onehot(counts["train"]), x,
                                                         l2), axis=1)]
  count_l2 = max(grid, key=lambda l2: float(np.mean(predict(x_select, l2) == counts["select"])))
  pred_counts = predict(x_test, count_l2)
  majority = values[np.argmax([np.sum(counts["train"] == v) for v in values])]
  metrics.update(count_acc=float(np.mean(pred_counts == counts["test"])),
                 count_majority=float(np.mean(counts["test"] == majority)), count_l2=count_l2,
                 num_train=len(x_train), num_select=len(x_select), num_examples=len(x_test),
                 num_labels=len(columns))
  names = [c[1] for c in columns]
  records = [dict(index=int(data["test"]["index"][i]), image_id=int(data["test"]["ids"][i]),
                  labels=[n for n, t in zip(names, y["test"][i]) if t > 0],
                  predicted=[n for n, s in zip(names, scores[i]) if s > 0],
                  count=int(counts["test"][i]), pred_count=int(pred_counts[i]))
             for i in range(len(x_test))]
  return {k: float(v) if not k.startswith("num_") else int(v) for k, v in metrics.items()}, records


# ------------------------------------------------------------------------------ inputs
def class_names(builder, name: str, label_names) -> dict[str, list[str]]:
  """{feature: class names} of the `objects/<feature>` ClassLabels of a TFDS builder."""
  features = builder.info.features
  if "objects" not in features:
    raise ValueError(f"config.evals.{name}.data: {builder.info.full_name} has no 'objects' "
                     "feature (the probe needs per-object ClassLabels, as locca_shapes has)")
  out = {}
  for label in label_names:
    try:
      feature = features["objects"][label]
    except KeyError:
      feature = None
    if not isinstance(feature, tfds.features.ClassLabel):
      raise ValueError(f"config.evals.{name}.labels: {builder.info.full_name} has no "
                       f"ClassLabel objects/{label} (expected one of the dataset's object "
                       "ClassLabels)")
    out[label] = list(feature.names)
  return out


def object_labels(builder, split: str, limit: int | None,
                  label_names) -> dict[int, dict[str, np.ndarray]]:
  """{image/id: {feature: class ids [M]}} of the first `limit` records of the split."""
  split = split if limit is None else f"{split}[:{limit}]"
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {"id": ex["image/id"],
                          **{k: ex["objects"][k] for k in label_names}})
  return {int(ex["id"]): {k: np.asarray(ex[k]) for k in label_names}
          for ex in tfds.as_numpy(ds)}


def features(ctx: common.Context, name: str, cfg, spec: dict, limit: int | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean-pooled encoder features float64 [N, E], image/id [N], index [N]) in split order."""
  ds = common.examples(ctx.config, spec, per_object=False, limit=limit).map(
      lambda ex: {k: ex[k] for k in ("image", "index", "image_id")})
  local = common.local_batch_size(ctx.config, name, cfg, ctx.mesh)
  pooled = jax.jit(lambda params, image: ctx.model.apply(
      {"params": params}, image, method=_encoder_tokens).astype(jnp.float32).mean(axis=1))
  records = []
  for batch in common.batches(ds, local):
    glob = sharding.global_batch(dict(image=batch["image"]), ctx.mesh)
    with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      out = common.local_rows(pooled(ctx.params, glob["image"]), ctx.mesh)
    for i in np.flatnonzero(batch["mask_valid"] > 0):
      records.append(dict(index=int(batch["index"][i]), image_id=int(batch["image_id"][i]),
                          x=[float(v) for v in out[i]]))
  records = sorted(common.gather_records(records), key=lambda r: r["index"])
  if not records:
    raise ValueError(f"config.evals.{name}: split {spec['split']!r} of {spec['name']} is empty")
  return (np.asarray([r["x"] for r in records], np.float64),
          np.asarray([r["image_id"] for r in records], np.int64),
          np.asarray([r["index"] for r in records], np.int64))


def _encoder_tokens(module, image):
  return module.img(image)  # [B, P, E]: the encoder alone, without img_proj or decoder


# ------------------------------------------------------------------------------ labels
def presence_columns(classes: dict[str, list[str]], pairs) -> list[tuple[str, str, tuple]]:
  """The presence labels as (group, name, conditions): an image is positive when one of its
  objects meets every (feature, class id) of `conditions`. Groups: each feature, then each
  pair joined by "_" (e.g. ("color_shape", "red circle", (("color", 0), ("shape", 0))))."""
  cols = [(f, names[c], ((f, c),)) for f, names in classes.items() for c in range(len(names))]
  for f, g in pairs:
    cols += [(f"{f}_{g}", f"{classes[f][a]} {classes[g][b]}", ((f, a), (g, b)))
             for a in range(len(classes[f])) for b in range(len(classes[g]))]
  return cols


def presence_targets(objects: list[dict[str, np.ndarray]], columns) -> np.ndarray:
  """+1 / -1 targets [N, K]: whether some object of each image meets each column."""
  y = -np.ones((len(objects), len(columns)), np.float64)
  for i, obj in enumerate(objects):
    for k, (_, _, conditions) in enumerate(columns):
      if np.any(np.logical_and.reduce([obj[f] == c for f, c in conditions])):
        y[i, k] = 1.0
  return y


# ------------------------------------------------------------------------------ probe
def standardize(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
  """Z-scores every array with the training features' per-dimension mean and std."""
  mean, std = train.mean(axis=0), train.std(axis=0)
  std = np.where(std > 0, std, 1.0)  # a constant dimension stays 0 instead of dividing by 0
  return tuple((x - mean) / std for x in (train, *others))


def ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray,
                  l2: float) -> np.ndarray:
  """Scores [N, K] of `x` under ridge regression fit on (x_train, y_train), strength l2 * n.

  The bias is not regularized: X and Y are centred, the bias is Y's training mean.
  """
  x_mean, y_mean = x_train.mean(axis=0), y_train.mean(axis=0)
  xc, yc = x_train - x_mean, y_train - y_mean
  gram = xc.T @ xc + l2 * len(x_train) * np.eye(x_train.shape[1])
  w = np.linalg.solve(gram, xc.T @ yc)
  return (x - x_mean) @ w + y_mean


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
  """AP of one label: sum over distinct thresholds of (recall step) x precision.

  scores [N] (higher = more likely positive), positive [N] bool with at least one True.
  """
  positive = np.asarray(positive, bool)
  if not positive.any():
    raise ValueError("average_precision: no positive example (AP is undefined)")
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  s, p = np.asarray(scores, np.float64)[order], positive[order]
  last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each tie group
  tp = np.cumsum(p)[last]
  precision, recall = tp / (last + 1), tp / p.sum()
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _mean_ap(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
  """(mean AP, mean prevalence) over the columns with both positives and negatives."""
  aps, prevalence = [], []
  for k in range(targets.shape[1]):
    pos = targets[:, k] > 0
    if 0 < pos.sum() < len(pos):
      aps.append(average_precision(scores[:, k], pos))
      prevalence.append(pos.mean())
  if not aps:
    return float("nan"), float("nan")
  return float(np.mean(aps)), float(np.mean(prevalence))
