"""`gcap`: grounded (region) captioning: describe the object in a given box.

Every object of the split is one example: prompt `gcap: <box tokens> :` with the ground-truth
box (normalized yxyx of the model input, written by the tokenizer's box codec exactly as in
training), greedy decoding, the text up to eos scored against that region's refexp with
CIDEr / BLEU-4 / ROUGE-L (`scoring.caption_scores`; one reference per example).

Metrics: `cider`, `bleu4`, `rouge_l`, `num_examples`.

Config (config.evals.NAME): type="gcap", data (one data spec of `locca_jax.data.sources`),
batch_size, max_examples (first N records), max_len (decoded tokens, default seq_len // 2),
log_steps.
"""
import numpy as np

from locca_jax.evaluators import caption
from locca_jax.evaluators import common
from locca_jax.evaluators import scoring


def evaluate(ctx: common.Context, name: str, cfg) -> tuple[dict[str, float], list[dict]]:
  """Returns ({"cider", "bleu4", "rouge_l", "num_examples"}, per-example records)."""
  tok = ctx.tokenizer
  data = common.eval_data(ctx.config, name, cfg)
  width, max_len = common.decode_budget(ctx.config, name, cfg,
                                        int(ctx.config.input.seq_len) // 2)

  def prompts(batch):
    return [prompt_ids(tok, ctx.config, box) for box in batch["box"]]

  ds = common.examples(ctx.config, data, per_object=True,
                       limit=common.max_examples(name, cfg))
  local = common.local_batch_size(ctx.config, name, cfg, ctx.mesh)
  records = []
  for batch, out in common.decode_batches(ctx, common.batches(ds, local), prompts,
                                          prompt_width=width, max_len=max_len):
    for i in np.flatnonzero(batch["mask_valid"] > 0):
      ref = common.text(batch["refexp"][i])
      if not scoring.caption_tokens(ref):
        continue  # A region without a description cannot be scored.
      records.append(dict(
          index=int(batch["index"][i]), image_id=int(batch["image_id"][i]),
          object=int(batch["object"][i]), box=[float(v) for v in batch["box"][i]],
          prediction=tok.decode(out[i]), references=[ref]))
  records = sorted(common.gather_records(records), key=lambda r: (r["index"], r["object"]))
  return caption.score(records)


def prompt_ids(tokenizer, config, box) -> list[int]:
  """`gcap: <box> :` ids (box: normalized yxyx [4]) as the training row starts."""
  return (tokenizer.encode(common.prefix(config, "gcap")) + tokenizer.encode_box(box)
          + tokenizer.encode(common.SEPARATOR))
