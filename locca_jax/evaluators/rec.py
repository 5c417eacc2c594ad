"""`rec`: referring expression comprehension (RefCOCO-style box accuracy).

Every object of the split is one example: prompt `aref: <refexp> :` (prefix from
config.input.prefixes), greedy decoding constrained to a box (`decode.BoxConstraint`; with
`constrained=False`, unconstrained: needed for a text-codec vocabulary that cannot write
every bin as one piece),
`Tokenizer.parse_box` on the continuation, IoU with the ground-truth box (both normalized yxyx
of the model input image; IoU is unchanged by the squash / letterbox resize).

Metrics (see `scoring.box_scores`): `acc@0.5`: fraction of examples with IoU >= 0.5 (a box at
exactly 0.5 is correct); `miou`: mean IoU, unparsable predictions counting 0; `unparsable`:
fraction of continuations that are not a box; `truncated`: fraction of referring expressions
cut (their last tokens dropped) to fit the prompt width seq_len - max_len; `num_examples`.

Config (config.evals.NAME): type="rec", data (one data spec of `locca_jax.data.sources`),
batch_size, max_examples (first N records), max_len (decoded tokens, default 8; the
constrained box takes 4 coordinate tokens + eos), constrained (default True), log_steps.
"""
import numpy as np

from locca_jax.evaluators import common
from locca_jax.evaluators import scoring

DEFAULT_MAX_LEN = 8


def evaluate(ctx: common.Context, name: str, cfg) -> tuple[dict[str, float], list[dict]]:
  """Returns ({"acc@0.5", "miou", "unparsable", "truncated", "num_examples"}, records)."""
  tok = ctx.tokenizer
  data = common.eval_data(ctx.config, name, cfg)
  width, max_len = common.decode_budget(ctx.config, name, cfg, DEFAULT_MAX_LEN)
  if width - len(prompt_ids(tok, ctx.config, "", width)[0]) < 1:
    raise ValueError(f"config.evals.{name}.max_len={max_len} leaves no room for the referring "
                     f"expression in config.input.seq_len={ctx.config.input.seq_len}")

  def prompts(batch):
    return [prompt_ids(tok, ctx.config, common.text(r), width)[0]
            for r in batch["refexp"]]

  ds = common.examples(ctx.config, data, per_object=True,
                       limit=common.max_examples(name, cfg))
  local = common.local_batch_size(ctx.config, name, cfg, ctx.mesh)
  records = []
  for batch, out in common.decode_batches(
      ctx, common.batches(ds, local), prompts, prompt_width=width, max_len=max_len,
      box_constraint=box_constraint(ctx.config, tok, name, cfg)):
    for i in np.flatnonzero(batch["mask_valid"] > 0):
      records.append(dict(
          index=int(batch["index"][i]), image_id=int(batch["image_id"][i]),
          object=int(batch["object"][i]), refexp=common.text(batch["refexp"][i]),
          gt_box=[float(v) for v in batch["box"][i]], tokens=[int(t) for t in out[i]],
          truncated=prompt_ids(tok, ctx.config, common.text(batch["refexp"][i]), width)[1]))
  records = sorted(common.gather_records(records), key=lambda r: (r["index"], r["object"]))
  return score(tok, records)


def box_constraint(config, tokenizer, name: str, cfg):
  """The decoder's BoxConstraint for `aref:` prompts, or None with `constrained=False`."""
  if not cfg.get("constrained", True):
    return None
  from locca_jax import decode as decode_lib  # pylint: disable=g-import-not-at-top
  try:
    return decode_lib.BoxConstraint.from_tokenizer(
        tokenizer, prefix=common.prefix(config, "aref"), separator=common.SEPARATOR)
  except ValueError as e:
    raise ValueError(f"config.evals.{name}: {e} (or set constrained=False to decode boxes "
                     "unconstrained)") from None


def prompt_ids(tokenizer, config, refexp: str, width: int) -> tuple[list[int], bool]:
  """(`aref: <refexp> :` ids as the training row starts, whether the refexp was cut to fit
  `width` tokens)."""
  head = tokenizer.encode(common.prefix(config, "aref"))
  sep = tokenizer.encode(common.SEPARATOR)
  ids = tokenizer.encode(refexp)
  room = max(width - len(head) - len(sep), 0)
  return head + ids[:room] + sep, len(ids) > room


def score(tokenizer, records: list[dict]) -> tuple[dict[str, float], list[dict]]:
  """Metrics of records holding `tokens` (the continuation), `gt_box` (yxyx) and optionally
  `truncated` (the prompt's refexp was cut).

  Adds to each record `prediction` (decoded text), `pred_box` (yxyx or None), `iou`.
  """
  pred_boxes = scoring.parse_boxes(tokenizer, [r["tokens"] for r in records])
  gt = np.asarray([r["gt_box"] for r in records], np.float64).reshape(-1, 4)
  ious = scoring.box_ious(pred_boxes, gt)
  metrics = scoring.box_scores(pred_boxes, gt)
  metrics["truncated"] = float(sum(r.get("truncated", False) for r in records)) / max(
      len(records), 1)
  metrics["num_examples"] = len(records)
  out = []
  for r, box, iou in zip(records, pred_boxes, ious):
    r = dict(r, prediction=tokenizer.decode(r["tokens"]),
             pred_box=None if box is None else [float(v) for v in box], iou=float(iou))
    del r["tokens"]
    out.append(r)
  return metrics, out
