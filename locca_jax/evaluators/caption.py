"""`caption`: image captioning, scored with CIDEr / BLEU-4 / ROUGE-L.

One example per image that has at least one caption: prompt `cap:` (config.input.prefixes),
greedy decoding, the text up to eos against ALL of the image's reference captions. Texts are
normalized by `scoring.caption_tokens` (lowercase; runs of letters / digits are tokens;
punctuation dropped) and scored with pycocoevalcap's Cider, Bleu(4) and Rouge.

Metrics: `cider`, `bleu4`, `rouge_l`, `num_examples`.

Config (config.evals.NAME): type="caption", data (one data spec of `locca_jax.data.sources`),
batch_size, max_examples (first N records), max_len (decoded tokens, default seq_len - 8),
log_steps.
"""
import numpy as np

from locca_jax.evaluators import common
from locca_jax.evaluators import scoring

PROMPT_WIDTH = 8  # default prompt width (`cap:` is 1-3 tokens)


def evaluate(ctx: common.Context, name: str, cfg) -> tuple[dict[str, float], list[dict]]:
  """Returns ({"cider", "bleu4", "rouge_l", "num_examples"}, per-example records)."""
  tok = ctx.tokenizer
  data = common.eval_data(ctx.config, name, cfg)
  width, max_len = common.decode_budget(ctx.config, name, cfg,
                                        int(ctx.config.input.seq_len) - PROMPT_WIDTH)
  head = tok.encode(common.prefix(ctx.config, "cap"))
  ds = common.examples(ctx.config, data, per_object=False,
                       limit=common.max_examples(name, cfg)).map(
      lambda ex: {k: ex[k] for k in ("image", "index", "image_id", "captions")})
  local = common.local_batch_size(ctx.config, name, cfg, ctx.mesh)
  records = []
  for batch, out in common.decode_batches(ctx, common.batches(ds, local),
                                          lambda b: [head] * len(b["image"]),
                                          prompt_width=width, max_len=max_len):
    for i in np.flatnonzero(batch["mask_valid"] > 0):
      refs = [common.text(c) for c in batch["captions"][i]]
      refs = [c for c in refs if scoring.caption_tokens(c)]
      if not refs:
        continue  # An image without captions is not a captioning example.
      records.append(dict(index=int(batch["index"][i]), image_id=int(batch["image_id"][i]),
                          prediction=tok.decode(out[i]), references=refs))
  records = sorted(common.gather_records(records), key=lambda r: r["index"])
  return score(records)


def score(records: list[dict]) -> tuple[dict[str, float], list[dict]]:
  """Metrics of records holding `prediction` and `references`; adds per-example `cider`."""
  metrics, per_example = scoring.caption_scores([r["prediction"] for r in records],
                                                [r["references"] for r in records])
  metrics["num_examples"] = len(records)
  return metrics, [dict(r, cider=float(c)) for r, c in zip(records, per_example)]
