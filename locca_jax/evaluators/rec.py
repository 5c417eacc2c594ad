"""`rec`: referring expression comprehension (RefCOCO-style box accuracy).

Every object of the split is one example: prompt `aref: <refexp> :` (prefix from
config.input.prefixes), greedy decoding constrained to a box (`decode.BoxConstraint`),
`Tokenizer.parse_box` on the continuation, IoU with the ground-truth box (both normalized yxyx
of the model input image; IoU is unchanged by the squash / letterbox resize).

Metrics (see `scoring.box_scores`): `acc@0.5`: fraction of examples with IoU >= 0.5 (a box at
exactly 0.5 is correct); `miou`: mean IoU, unparsable predictions counting 0; `unparsable`:
fraction of continuations that are not a box; `num_examples`.

Config (config.evals.NAME): type="rec", data=dict(name, split[, data_dir]), batch_size,
max_examples (first N images), max_len (decoded tokens, default 12), log_steps.
"""
import numpy as np

from locca_jax.evaluators import common
from locca_jax.evaluators import scoring

DEFAULT_MAX_LEN = 12


def evaluate(ctx: common.Context, name: str, cfg) -> tuple[dict[str, float], list[dict]]:
  """Returns ({"acc@0.5", "miou", "unparsable", "num_examples"}, per-example records)."""
  from locca_jax import decode as decode_lib  # pylint: disable=g-import-not-at-top
  tok = ctx.tokenizer
  data = common.eval_data(ctx.config, name, cfg)
  width, max_len = common.decode_budget(ctx.config, name, cfg, DEFAULT_MAX_LEN)
  head, sep = tok.encode(common.prefix(ctx.config, "aref")), tok.encode(common.SEPARATOR)

  def prompts(batch):
    return [head + tok.encode(common.text(r)) + sep if v else head
            for r, v in zip(batch["refexp"], batch["mask_valid"])]

  ds = common.examples(ctx.config, data, per_object=True)
  local = common.local_batch_size(ctx.config, name, cfg, ctx.mesh)
  records = []
  for batch, out in common.decode_batches(
      ctx, common.batches(ds, local), prompts, prompt_width=width, max_len=max_len,
      box_constraint=decode_lib.BoxConstraint.from_tokenizer(
          tok, prefix=common.prefix(ctx.config, "aref"), separator=common.SEPARATOR)):
    for i in np.flatnonzero(batch["mask_valid"] > 0):
      records.append(dict(
          index=int(batch["index"][i]), image_id=int(batch["image_id"][i]),
          object=int(batch["object"][i]), refexp=common.text(batch["refexp"][i]),
          gt_box=[float(v) for v in batch["box"][i]], tokens=[int(t) for t in out[i]]))
  records = sorted(common.gather_records(records), key=lambda r: (r["index"], r["object"]))
  return score(tok, records)


def score(tokenizer, records: list[dict]) -> tuple[dict[str, float], list[dict]]:
  """Metrics of records holding `tokens` (the continuation) and `gt_box` (yxyx).

  Adds to each record `prediction` (decoded text), `pred_box` (yxyx or None), `iou`.
  """
  pred_boxes = scoring.parse_boxes(tokenizer, [r["tokens"] for r in records])
  gt = np.asarray([r["gt_box"] for r in records], np.float64).reshape(-1, 4)
  ious = scoring.box_ious(pred_boxes, gt)
  metrics = scoring.box_scores(pred_boxes, gt)
  metrics["num_examples"] = len(records)
  out = []
  for r, box, iou in zip(records, pred_boxes, ious):
    r = dict(r, prediction=tokenizer.decode(r["tokens"]),
             pred_box=None if box is None else [float(v) for v in box], iou=float(iou))
    del r["tokens"]
    out.append(r)
  return metrics, out
