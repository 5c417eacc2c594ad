"""Teacher-forced log-likelihood of given token rows, with one encoder pass per image.

B: batch (images), T: rows per image, L: row length, V: vocabulary, P: visual tokens,
F: decoder width.

    visual = encode(model, mesh, params, images)                    # [B, P, F]
    ll = row_log_likelihoods(model, mesh, params, visual, rows, weights)   # [B, T]

`rows` are the target token ids of T sequences per image, laid out as the training rows are
(`data/tasks.py`: prefix, text, eos, pad); the decoder reads them shifted right by one from BOS
with a causal mask (`decoder.decoder_inputs`, no parallel prediction), exactly as in training,
and all T rows of an image cross-attend to that image's visual tokens (the decoder's task axis).
The result is, per row,

    ll[b, t] = sum_l weights[b, t, l] * log softmax(logits[b, t, l])[rows[b, t, l]]

in float32 (positions with weight 0 never count, even where the logits are not finite). Rows
shared by all images may be given as [T, L] (broadcast inside the jitted function, not copied
per image on the host). Causal attention makes a row's likelihood independent of the row
length L and of the other rows, so callers may cut L to their longest row and split T into
chunks.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from locca_jax import sharding
from locca_jax import static_arg
from locca_jax.models import decoder as decoder_lib


@functools.partial(jax.jit, static_argnames="static")
def _encode_jit(params, images, static):
  return static.model.apply({"params": params}, images, method="encode")


@functools.partial(jax.jit, static_argnames="static")
def _row_ll_jit(params, visual, rows, weights, static):
  if rows.ndim == 2:  # [T, L]: the same rows for every image
    rows = jnp.broadcast_to(rows, (visual.shape[0],) + rows.shape)
    weights = jnp.broadcast_to(weights, rows.shape)
  tokens, self_mask = decoder_lib.decoder_inputs(rows)
  logits = static.model.apply({"params": params}, tokens, visual, self_mask, method="decode")
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), rows)
  return -jnp.sum(jnp.where(weights > 0, nll * weights, 0.0), axis=-1)


def encode(model, mesh, params, images):
  """Visual tokens [B, P, F] of a global image batch [B, H, W, 3] (one encoder pass)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return _encode_jit(params, images, static_arg.StaticModel(model, mesh))


def row_log_likelihoods(model, mesh, params, visual, rows, weights):
  """Summed weighted token log-likelihoods [B, T] of `rows` given `visual` (see module doc).

  Args:
    visual: [B, P, F] from `encode`.
    rows: int [B, T, L] (e.g. a global batch) or [T, L] (the same rows for every image).
    weights: float of the shape of `rows`; 1 where a token counts.
  """
  if rows.shape != weights.shape or rows.ndim not in (2, 3):
    raise ValueError(f"rows {rows.shape} and weights {weights.shape}: expected the same shape, "
                     "[B, T, L] or [T, L]")
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return _row_ll_jit(params, visual, rows, weights, static_arg.StaticModel(model, mesh))
