"""`dense`: dense captioning: several free `aref:` (region caption, box) pairs per image, scored
with COCO detection mAP (pycocotools) against the ground-truth regions.

b: per-process batch, K: samples per image (`num_samples`), Lp: prompt width, N: decoded
tokens (`max_len`), M: regions.

Generation. The prompt is the `aref:` prefix alone (config.input.prefixes): the model writes
a whole ARef row, `<region caption> : <box> <eos>`, choosing the region itself. K continuations
per image are sampled (`decode.decode(method="sample")` at `temperature`, `top_k`; one decoder
call per sample, key = fold_in(fold_in(PRNGKey(seed), batch number), sample)), so the draws
depend on the seed and on the batch layout. A continuation is read as `data/tasks.py` writes
an ARef row: the tokens before the first separator ":" (tokenized on its own) are the region
caption, the tokens after it must start with a box (`Tokenizer.parse_box`; tokens after the
box are ignored). A continuation without separator, with an empty caption, without a box or
with a degenerate one (xmax <= xmin or ymax <= ymin) is `unparsable` and dropped; identical
(normalized caption, box) pairs of one image are kept once. The score of a pair is the model's
log-likelihood of its continuation (the sum of its token log-probs up to and including eos,
teacher-forced at temperature 1 against the same visual tokens:
`likelihood.row_log_likelihoods`), so the ranking does not depend on how it was drawn.

Caption match is EXACT. A prediction and a ground-truth region match only if their texts are
identical after the caption normalization of `scoring.caption_tokens` (lowercase, punctuation
dropped) and their boxes overlap by IoU >= the COCO threshold. Implemented by giving every
distinct ground-truth text its own COCO category: COCOeval's per-category matching (by score,
each region matched at most once) then does the caption match, and AP is averaged over the
texts that occur in the ground truth. A predicted text that no region of the evaluated images
has can match nothing: it is left out of COCOeval (it would be a detection of a category
without ground truth, which COCOeval ignores) and counted in `unknown_text`. A region whose
normalized text is empty is not ground truth.

Boxes are normalized yxyx of the model input; COCO gets xywh in pixels of the
config.input.image_size square (only the "all" area range is reported).

Metrics: `map` (AP@[.5:.95], COCOeval stats[0], up to max(100, K) detections per image),
`ap50`, `ap75`, `predictions_per_image` (pairs kept), `unparsable` (fraction of samples),
`unknown_text` (fraction of kept pairs), `num_examples` (images), `num_regions`.

Config (config.evals.NAME): type="dense", data (one data spec of `locca_jax.data.sources`),
batch_size, max_examples (first N records), max_len (decoded tokens, default seq_len - 8),
num_samples (default 8), temperature (default 1.0), top_k (default 0: no top-k), seed
(default config.seed), log_steps.
"""
import contextlib
import io

import flax.linen as nn
import jax
import numpy as np
import tensorflow as tf

from locca_jax import sharding
from locca_jax.evaluators import common
from locca_jax.evaluators import likelihood
from locca_jax.evaluators import scoring

PROMPT_WIDTH = 8  # default prompt width (`aref:` is 1-3 tokens)
DEFAULT_SAMPLES = 8
COCO_MAX_DETS = 100


def options(config, name: str, cfg) -> dict:
  """The validated sampling fields of `config.evals.NAME` (reads no data)."""
  where = f"config.evals.{name}"
  k = cfg.get("num_samples", DEFAULT_SAMPLES)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"{where}.num_samples={k!r}: expected a positive number of sampled "
                     "(caption, box) pairs per image")
  temperature = cfg.get("temperature", 1.0)
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
      temperature > 0):
    raise ValueError(f"{where}.temperature={temperature!r}: expected a number > 0")
  top_k = cfg.get("top_k", 0)
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"{where}.top_k={top_k!r}: expected an integer >= 0 (0: no top-k)")
  seed = cfg.get("seed", None)
  seed = int(config.seed) if seed is None else seed
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"{where}.seed={seed!r}: expected an integer (or None: config.seed)")
  return dict(num_samples=k, temperature=float(temperature), top_k=top_k, seed=seed)


def default_max_len(config) -> int:
  return int(config.input.seq_len) - PROMPT_WIDTH


def evaluate(ctx: common.Context, name: str, cfg) -> tuple[dict[str, float], list[dict]]:
  """Returns ({"map", "ap50", "ap75", "predictions_per_image", ...}, per-image records)."""
  from locca_jax import decode as decode_lib  # pylint: disable=g-import-not-at-top
  tok = ctx.tokenizer
  opts = options(ctx.config, name, cfg)
  data = common.eval_data(ctx.config, name, cfg)
  width, max_len = common.decode_budget(ctx.config, name, cfg, default_max_len(ctx.config))
  head = tok.encode(common.prefix(ctx.config, "aref"))
  sep = tok.encode(common.SEPARATOR)
  ds = common.examples(ctx.config, data, per_object=False,
                       limit=common.max_examples(name, cfg)).map(
      lambda ex: dict({k: ex[k] for k in ("image", "index", "image_id", "boxes", "refexps")},
                      num_regions=tf.shape(ex["boxes"])[0]))  # batches pad boxes / refexps
  local = common.local_batch_size(ctx.config, name, cfg, ctx.mesh)
  base_key = jax.random.PRNGKey(opts["seed"])
  records = []
  for step, batch in enumerate(common.batches(ds, local)):
    prompts, lens = common.prompt_array(
        [head] * len(batch["image"]), width,
        lambda i, batch=batch: f"example index={int(batch['index'][i])}")
    glob = sharding.global_batch(dict(image=batch["image"], prompts=prompts, prompt_lens=lens),
                                 ctx.mesh)
    samples = []
    for k in range(opts["num_samples"]):
      key = np.asarray(jax.random.fold_in(jax.random.fold_in(base_key, step), k))
      with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        out = decode_lib.decode(ctx.model, ctx.params, glob["image"], glob["prompts"],
                                glob["prompt_lens"], max_len=max_len, eos_id=tok.eos_id,
                                method="sample", temperature=opts["temperature"],
                                top_k=opts["top_k"], rng=key)
      samples.append(common.local_rows(out, ctx.mesh))
    cont = np.stack(samples, 1)  # [b, K, N]
    rows, weights = continuation_rows(head, cont, tok.eos_id)
    rows_g = sharding.global_batch(dict(rows=rows, weights=weights), ctx.mesh)
    visual = likelihood.encode(ctx.model, ctx.mesh, ctx.params, glob["image"])
    ll = common.local_rows(likelihood.row_log_likelihoods(
        ctx.model, ctx.mesh, ctx.params, visual, rows_g["rows"], rows_g["weights"]), ctx.mesh)
    for i in np.flatnonzero(batch["mask_valid"] > 0):
      m = int(batch["num_regions"][i])
      regions = [dict(text=common.text(t), box=[float(v) for v in b])
                 for t, b in zip(batch["refexps"][i, :m], batch["boxes"][i, :m])]
      preds, unparsable = predictions(tok, cont[i], ll[i], sep)
      records.append(dict(index=int(batch["index"][i]), image_id=int(batch["image_id"][i]),
                          regions=regions, predictions=preds, samples=len(cont[i]),
                          unparsable=unparsable))
  records = sorted(common.gather_records(records), key=lambda r: r["index"])
  try:
    return score(records, int(ctx.config.input.image_size), opts["num_samples"])
  except ValueError as e:
    raise ValueError(f"config.evals.{name}.data: {e}") from None


def continuation_rows(head: list[int], cont: np.ndarray, eos_id: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Rows to score: prompt + continuation (int32 [b, K, len(head) + N]) and weights
  (float32, 1 on the continuation's tokens up to and including its first eos; all N without
  eos)."""
  b, k, n = cont.shape
  length = np.where((cont == eos_id).any(-1), np.argmax(cont == eos_id, -1) + 1, n)
  rows = np.concatenate([np.broadcast_to(np.asarray(head, np.int32), (b, k, len(head))),
                         cont.astype(np.int32)], -1)
  weights = np.zeros(rows.shape, np.float32)
  weights[..., len(head):] = np.arange(n) < length[..., None]
  rows[..., len(head):] *= weights[..., len(head):].astype(np.int32)  # pad after eos
  return rows, weights


def parse_pair(tokenizer, ids, sep: list[int]) -> tuple[str, np.ndarray] | None:
  """A continuation (ids after `aref:`) -> (region caption, yxyx box), or None if unparsable.

  The caption is the text of the tokens before the first `sep` run; the tokens after it must
  start with a box with xmax > xmin and ymax > ymin (see the module docstring).
  """
  ids = [int(t) for t in ids]
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  n = len(sep)
  for p in range(len(ids) - n + 1):
    if ids[p:p + n] == sep:
      text = tokenizer.decode(ids[:p])
      if not scoring.caption_tokens(text):
        return None
      box = tokenizer.parse_box(np.asarray(ids[p + n:], np.int64))
      if box is None or box[2] <= box[0] or box[3] <= box[1]:
        return None  # no box, or one with ymax <= ymin / xmax <= xmin
      return text, box
  return None


def predictions(tokenizer, cont: np.ndarray, scores: np.ndarray, sep: list[int]
                ) -> tuple[list[dict], int]:
  """(distinct parsed pairs {text, box, score} of one image's K continuations, best score per
  (normalized text, box); number of unparsable continuations)."""
  best, unparsable = {}, 0
  for ids, s in zip(cont, scores):
    pair = parse_pair(tokenizer, ids, sep)
    if pair is None:
      unparsable += 1
      continue
    text, box = pair
    key = (scoring.caption_tokens(text), tuple(float(v) for v in box))
    if key not in best or s > best[key]["score"]:
      best[key] = dict(text=text, box=[float(v) for v in box], score=float(s))
  return sorted(best.values(), key=lambda p: -p["score"]), unparsable


def _xywh(box, size: float) -> list[float]:
  ymin, xmin, ymax, xmax = (float(v) * size for v in box)
  return [xmin, ymin, xmax - xmin, ymax - ymin]


def score(records: list[dict], image_size: int,
          max_dets: int = COCO_MAX_DETS) -> tuple[dict[str, float], list[dict]]:
  """COCO mAP of records holding `index`, `regions` and `predictions` ({text, box yxyx[,
  score]}) and optionally `samples` / `unparsable` counts (see the module docstring).

  A ValueError if no record has a region with a non-empty text.
  """
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  images = [dict(id=int(r["index"])) for r in records]
  categories, gts, dts = {}, [], []
  for r in records:
    for g in r["regions"]:
      text = scoring.caption_tokens(g["text"])
      if not text:
        continue
      cat = categories.setdefault(text, len(categories) + 1)
      bbox = _xywh(g["box"], image_size)
      gts.append(dict(id=len(gts) + 1, image_id=int(r["index"]), category_id=cat, bbox=bbox,
                      area=bbox[2] * bbox[3], iscrowd=0))
  if not gts:
    raise ValueError(f"no ground-truth region with a text in the {len(records)} evaluated "
                     "images (dense captioning needs regions with region texts)")
  unknown = kept = 0
  for r in records:
    for p in r["predictions"]:
      kept += 1
      cat = categories.get(scoring.caption_tokens(p["text"]))
      if cat is None:
        unknown += 1
        continue
      bbox = _xywh(p["box"], image_size)
      dts.append(dict(id=len(dts) + 1, image_id=int(r["index"]), category_id=cat, bbox=bbox,
                      area=bbox[2] * bbox[3], score=float(p.get("score", 1.0)), iscrowd=0))
  cats = [dict(id=i, name=t) for t, i in categories.items()]
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
    gt, dt = COCO(), COCO()
    gt.dataset = dict(images=images, categories=cats, annotations=gts)
    dt.dataset = dict(images=images, categories=cats, annotations=dts)
    gt.createIndex()
    dt.createIndex()
    ev = COCOeval(gt, dt, "bbox")
    ev.params.maxDets = [1, 10, max(COCO_MAX_DETS, int(max_dets))]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  n = max(len(records), 1)
  samples = sum(r.get("samples", 0) for r in records)
  metrics = dict(map=float(ev.stats[0]), ap50=float(ev.stats[1]), ap75=float(ev.stats[2]),
                 predictions_per_image=kept / n,
                 unparsable=sum(r.get("unparsable", 0) for r in records) / max(samples, 1),
                 unknown_text=unknown / max(kept, 1), num_examples=len(records),
                 num_regions=len(gts))
  return metrics, records
