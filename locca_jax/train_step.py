"""Loss, train state and the sharded train step. Imports no TensorFlow.

B: batch (images), T: task sequences per image, L: text length, V: vocabulary.

A batch is a dict: `image` [B, H, W, 3] uint8 pixels or float in [-1, 1] (`models.vit.ViT`), `text` [B, T, L] int targets,
`mask_loss` [B, T, L] float (1 where a token is trained). Row t of `text` is task
`config.input.tasks[t]`.
"""
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from locca_jax import optim
from locca_jax import sharding
from locca_jax.models import decoder as decoder_lib

State = dict[str, Any]  # params, opt_state, step (int32 scalar), rng (uint32[2] key data)


def token_nll(logits: jax.Array, text: jax.Array) -> jax.Array:
  """Per-token cross-entropy [B, T, L] (float32) of logits [B, T, L, V]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), text)


def chunked_token_nll(features: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                      text: jax.Array, chunk: int) -> jax.Array:
  """`token_nll` of the logits `features @ kernel + bias`, without ever holding them whole.

  features [B, T, L, F] (the decoder's, `features_only=True`), kernel [F, V] and bias [V] (the
  decoder's `head`), text [B, T, L]. The sequence axis is cut into L / `chunk` pieces; each
  piece's logits [B, T, chunk, V] are computed (in the features' dtype, as the head's Dense
  does), reduced to NLL and dropped, and recomputed in the backward pass (`jax.checkpoint`).
  The peak thus holds one piece's logits instead of [B, T, L, V] in float32 plus its gradient:
  with a 32k vocabulary that is most of a LocCa train step's activation memory. Cutting along L
  keeps every piece sharded like the batch.
  """
  b, t, l, f = features.shape
  if chunk <= 0 or l % chunk:
    raise ValueError(f"config.xent_chunk={chunk}: expected a positive divisor of the text "
                     f"length {l} (config.input.seq_len), or 0 for whole logits")
  pieces = l // chunk
  h = features.reshape(b, t, pieces, chunk, f).transpose(2, 0, 1, 3, 4)  # [n, B, T, c, F]
  y = text.reshape(b, t, pieces, chunk).transpose(2, 0, 1, 3)  # [n, B, T, c]

  @jax.checkpoint
  def piece(h_piece, y_piece):
    logits = jnp.einsum("btcf,fv->btcv", h_piece, kernel.astype(h_piece.dtype))
    if bias is not None:
      logits = logits + bias.astype(logits.dtype)
    logits = nn.with_logical_constraint(logits, ("act_batch", None, "act_len", "act_vocab"))
    return token_nll(logits, y_piece)

  nll = jax.lax.map(lambda hy: piece(*hy), (h, y))  # [n, B, T, c]
  return nll.transpose(1, 2, 0, 3).reshape(b, t, l)


def model_token_nll(model: nn.Module, params, image: jax.Array, tokens: jax.Array,
                    self_mask: jax.Array, text: jax.Array, chunk: int = 0) -> jax.Array:
  """Per-token NLL [B, T, L] of `text` under the model: from whole logits (`chunk` 0) or
  piecewise from the decoder's features (`chunked_token_nll`, `chunk` = config.xent_chunk)."""
  if not chunk:
    return token_nll(model.apply({"params": params}, image, tokens, self_mask), text)
  features = model.apply({"params": params}, image, tokens, self_mask, features_only=True)
  head = params["txt"]["head"]
  return chunked_token_nll(features, head["kernel"], head.get("bias"), text, chunk)


def compute_loss(logits: jax.Array, text: jax.Array, mask_loss: jax.Array,
                 task_names: Sequence[str]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token cross-entropy averaged over all trained tokens, plus one mean per task."""
  return masked_losses(token_nll(logits, text), mask_loss, task_names)


def masked_losses(nll: jax.Array, mask_loss: jax.Array,
                  task_names: Sequence[str]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-token NLL [B, T, L] -> (mean over trained tokens, {train/loss, train/loss_<task>})."""
  weighted = nll * mask_loss  # [B, T, L]
  loss = weighted.sum() / jnp.maximum(mask_loss.sum(), 1.0)
  per_task_sum, per_task_count = weighted.sum(axis=(0, 2)), mask_loss.sum(axis=(0, 2))
  metrics = {f"train/loss_{name}": per_task_sum[t] / jnp.maximum(per_task_count[t], 1.0)
             for t, name in enumerate(task_names)}
  metrics["train/loss"] = loss
  return loss, metrics


def sample_parallel(rng: jax.Array, batch_size: int, task_names: Sequence[str],
                    fraction: float) -> jax.Array | None:
  """[B, T] bool: the Cap rows of a random `fraction` of images use parallel prediction; None
  when no row can (every row causal: `decoder_inputs` then builds no mask)."""
  if fraction <= 0 or "cap" not in task_names:
    return None
  parallel = jnp.zeros((batch_size, len(task_names)), bool)
  chosen = jax.random.bernoulli(rng, fraction, (batch_size,))
  return parallel.at[:, list(task_names).index("cap")].set(chosen)


def make_loss_fn(model: nn.Module, config: ml_collections.ConfigDict) -> Callable:
  """`loss_fn(params, batch, rng) -> (loss, metrics)`.

  `config.xent_chunk` > 0 computes the cross-entropy piecewise (`chunked_token_nll`); 0 (the
  default) from whole logits.
  """
  task_names = tuple(config.input.tasks)
  fraction = config.model.get("parallel_fraction", 0.0)
  chunk = int(config.get("xent_chunk", 0) or 0)

  def loss_fn(params, batch, rng):
    parallel = sample_parallel(rng, batch["text"].shape[0], task_names, fraction)
    tokens, self_mask = decoder_lib.decoder_inputs(batch["text"], parallel)
    nll = model_token_nll(model, params, batch["image"], tokens, self_mask, batch["text"],
                          chunk)
    return masked_losses(nll, batch["mask_loss"], task_names)
  return loss_fn


def dummy_inputs(image_size: int, num_rows: int, seq_len: int):
  """(image, tokens, self_mask) of batch 1: what `model.init` needs to build the params."""
  return (jnp.zeros((1, image_size, image_size, 3), jnp.float32),
          jnp.zeros((1, num_rows, seq_len), jnp.int32),
          jnp.ones((1, num_rows, seq_len, seq_len), bool))


class StateSpec(NamedTuple):
  """Everything needed to create or restore the train state on a mesh."""
  init: Callable[[], State]  # jitted: returns a freshly initialized, sharded state
  abstract: State  # ShapeDtypeStructs with shardings: what a checkpoint restores into
  shardings: State
  tx: optax.GradientTransformation
  schedule_fn: Callable  # step -> learning-rate multiplier; lr = config.lr * schedule_fn


def make_state_spec(model: nn.Module, config: ml_collections.ConfigDict,
                    mesh: Mesh) -> StateSpec:
  """Shapes and shardings of the train state; params float32 whatever the compute dtype."""
  dummy = dummy_inputs(config.input.image_size, len(config.input.tasks),
                       config.input.seq_len)
  init_params = lambda rng: model.init(rng, *dummy)["params"]  # pylint: disable=unnecessary-lambda-assignment
  boxed = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  tx, schedule_fn = optim.make(config, boxed)

  def init():
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    params = nn.unbox(init_params(init_rng))
    return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                rng=train_rng)

  shapes = jax.eval_shape(init)
  params_sh = sharding.param_shardings(boxed, mesh)
  replicated = NamedSharding(mesh, P())
  state_sh = dict(
      params=params_sh,
      opt_state=sharding.matching_shardings(shapes["opt_state"], shapes["params"], params_sh,
                                            mesh),
      step=replicated, rng=replicated)
  abstract = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh)
  return StateSpec(jax.jit(init, out_shardings=state_sh), abstract, state_sh, tx,
                   schedule_fn)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh: Mesh,
                    state_sh: State) -> Callable[[State, dict], tuple[State, dict]]:
  """One jitted step: explicit in/out shardings, the state donated."""
  loss_fn = make_loss_fn(model, config)

  def step(state, batch):
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
      rng = jax.random.fold_in(state["rng"], state["step"])
      (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state["params"], batch, rng)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
    metrics["train/grad_norm"] = optax.global_norm(grads)
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1,
                     rng=state["rng"])
    return new_state, metrics

  jitted = jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)

  def run(state, batch):
    with jax.set_mesh(mesh):  # activation sharding constraints resolve against this mesh
      return jitted(state, batch)
  run.jitted = jitted
  return run
