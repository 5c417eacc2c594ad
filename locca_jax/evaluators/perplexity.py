"""`perplexity`: teacher-forced token NLL / perplexity per task on an eval split.

The eval split's task rows are built exactly as in training (`input_pipeline.make_eval_dataset`:
same preprocessing, prefixes, loss masks, and the same stateless per-example sampling of the
caption / object of each row). Per task t, over all trained tokens (mask_loss 1) of all valid
examples (mask_valid 1; padding rows never count):

  nll_t = sum(token NLL * mask) / sum(mask),   ppl_t = exp(nll_t)

and `nll` / `ppl` over the tokens of all tasks together: the masked mean of
`train_step.compute_loss`, accumulated over the whole split instead of one batch.

Metrics: `nll`, `ppl`, `nll_<task>`, `ppl_<task>`, `tokens_<task>`, `num_examples`.

Config (config.evals.NAME): type="perplexity", data (one data spec of
`locca_jax.data.sources`), batch_size, max_examples (first N records of a TFDS split),
log_steps.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from locca_jax import sharding
from locca_jax import static_arg
from locca_jax import train_step
from locca_jax.data import input_pipeline
from locca_jax.data.sources import tfds_sources
from locca_jax.evaluators import common
from locca_jax.models import decoder as decoder_lib

FIELDS = ("image", "text", "mask_loss", "mask_valid")


@functools.partial(jax.jit, static_argnames=("static", "chunk"))
def _sums_jit(params, batch, static, chunk):
  text = batch["text"]
  tokens, self_mask = decoder_lib.decoder_inputs(text)
  # As in training: with `chunk`, never the whole [B, T, L, V] logits (large eval batches).
  nll = train_step.model_token_nll(static.model, params, batch["image"], tokens, self_mask,
                                   text, chunk)
  weight = batch["mask_loss"] * batch["mask_valid"][:, None, None]
  nll = jnp.where(weight > 0, nll * weight, 0.0)  # padding never scores, even if not finite
  out = (nll.sum(axis=(0, 2)), weight.sum(axis=(0, 2)), batch["mask_valid"].sum())
  return jax.lax.with_sharding_constraint(out, NamedSharding(static.mesh, P()))


def nll_sums(model, mesh, params, batch, chunk: int = 0):
  """(NLL sum [T], trained-token count [T], valid examples []) of a global batch, replicated.

  Only tokens with mask_loss 1 in rows with mask_valid 1 count. `chunk`: config.xent_chunk.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return _sums_jit(params, batch, static_arg.StaticModel(model, mesh), int(chunk))


def evaluate(ctx: common.Context, name: str, cfg) -> tuple[dict[str, float], list[dict]]:
  """Returns ({"nll", "ppl", "nll_<task>", ...}, []) (no per-example records)."""
  tasks = tuple(ctx.config.input.tasks)
  data = common.eval_data(ctx.config, name, cfg)
  limit = common.max_examples(name, cfg)
  if limit is not None:
    if data["source"] != "tfds":
      raise ValueError(f"config.evals.{name}.max_examples={limit}: supported for a plain TFDS "
                       f"split only, got {data} (drop max_examples)")
    data["split"] = tfds_sources.head_split(data, limit)
  local = common.local_batch_size(ctx.config, name, cfg, ctx.mesh)
  ds = input_pipeline.make_eval_dataset(ctx.config, ctx.tokenizer, data=data,
                                        batch_size=local * jax.process_count())
  nll_sum, count = np.zeros(len(tasks), np.float64), np.zeros(len(tasks), np.float64)
  num_examples = 0.0
  for batch in ds.as_numpy_iterator():
    glob = sharding.global_batch({k: batch[k] for k in FIELDS}, ctx.mesh)
    s, c, n = jax.device_get(nll_sums(ctx.model, ctx.mesh, ctx.params, glob,
                                      ctx.config.get("xent_chunk", 0) or 0))
    nll_sum += s
    count += c
    num_examples += float(n)
  metrics = {}
  for t, task in enumerate(tasks):
    if count[t]:
      metrics[f"nll_{task}"] = nll_sum[t] / count[t]
      metrics[f"ppl_{task}"] = math.exp(metrics[f"nll_{task}"])
    metrics[f"tokens_{task}"] = count[t]
  total = count.sum()
  metrics["nll"] = nll_sum.sum() / max(total, 1.0)
  metrics["ppl"] = math.exp(metrics["nll"])
  metrics["num_examples"] = int(round(num_examples))
  return {k: float(v) if k != "num_examples" else v for k, v in metrics.items()}, []
