"""CapPa-style text decoder over several task sequences per image.

B: batch (images), T: task sequences per image, L: text length, P: visual tokens, E: width,
V: vocabulary.

Self-attention runs per sequence ([B*T, L]); cross-attention flattens an image's T sequences
into one query axis ([B, T*L]) against that image's P visual tokens, so the visual keys and
values are projected once per image, not once per sequence.

Autoregressive decoding (`decode=True`, see `locca_jax.decode`): one token per sequence per call,
tokens [B, T, 1], at position `cache_index`; self_mask is not used (causality comes from the
cache). The "cache" collection holds, per layer (with a leading layer axis when `scan`):
  self_attn/cached_key, cached_value [B*T, max_len, H, D], self_attn/cache_index int32 [],
  cross_attn/cached_key, cached_value [B, P, H, D] (the visual tokens, projected once),
and the decoder's own `cache_index` (the position of the next token, for the position
embedding). The first call, made with "cache" mutable and absent, creates it (zeros, visual
keys/values projected) and its logits are meaningless; every later call feeds one token.
H: heads, D: head dim. Parameters are the same as for training: a trained checkpoint decodes.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from locca_jax.models import common

BOS_ID = 0  # inputs are the targets shifted right by one, starting with pad (T5 / big_vision).
MASK_ID = -1  # parallel prediction input; mapped to a learned embedding, not part of V.

ACT_BTLE = ("act_batch", None, "act_len", "act_embed")


def decoder_inputs(text: jax.Array,
                   parallel: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
  """Teacher-forcing inputs and self-attention mask.

  text: [B, T, L] int targets. parallel: [B, T] bool, rows trained with parallel prediction
  (CapPa): all their inputs become MASK_ID and their attention is bidirectional.
  Returns tokens [B, T, L] and mask [B, T, L, L] (True = may attend), or None without
  `parallel`: every row causal, which the decoder applies as a flag (no [L, L] mask; cuDNN's
  fused causal attention).
  """
  seq_len = text.shape[-1]
  shifted = jnp.pad(text[..., :-1], [(0, 0)] * (text.ndim - 1) + [(1, 0)],
                    constant_values=BOS_ID)
  if parallel is None:
    return shifted, None
  tokens = jnp.where(parallel[..., None], MASK_ID, shifted)
  causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
  mask = causal | parallel[..., None, None]
  return tokens, mask


class DecoderBlock(nn.Module):
  """Pre-LN: causal self-attention, cross-attention to visual tokens, MLP."""
  num_heads: int
  mlp_dim: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  decode: bool = False  # one token per call through the "cache" collection (module docstring)
  cache_len: int = 0  # self-attention cache length when decoding
  attention: str = "xla"  # common.Attention.implementation

  @nn.compact
  def __call__(self, x, visual, self_mask):
    # x: [B,T,L,E] visual: [B,P,E] self_mask: [B,T,L,L] or None (causal)
    b, t, l, e = x.shape
    y = common.layer_norm("ln_self", self.dtype)(x).reshape(b * t, l, e)
    # Decoding: causality comes from the cache index, self_mask is not used.
    if self.decode or self_mask is None:
      mask, is_causal = None, not self.decode
    else:
      mask, is_causal = self_mask.reshape(b * t, 1, l, l), False
    y = common.Attention(self.num_heads, self.use_bias, self.dtype,
                         kv_cache="append" if self.decode else "none",
                         cache_len=self.cache_len, implementation=self.attention,
                         name="self_attn")(y, y, mask=mask, is_causal=is_causal)
    x = common.constrain(x + y.reshape(b, t, l, e), ACT_BTLE)
    y = common.layer_norm("ln_cross", self.dtype)(x).reshape(b, t * l, e)
    y = common.Attention(self.num_heads, self.use_bias, self.dtype,
                         kv_cache="static" if self.decode else "none",
                         implementation=self.attention, name="cross_attn")(y, visual)
    x = common.constrain(x + y.reshape(b, t, l, e), ACT_BTLE)
    y = common.layer_norm("ln_mlp", self.dtype)(x)
    x = x + common.MlpBlock(self.mlp_dim, self.use_bias, self.dtype, name="mlp")(y)
    return common.constrain(x, ACT_BTLE)


class Decoder(nn.Module):
  """tokens [B,T,L] + visual [B,P,E] -> logits [B,T,L,V] (untied output embedding).

  self_mask [B,T,L,L], or None: every row causal (`decoder_inputs` without `parallel`).
  With `decode=True`: tokens [B,T,1] -> logits [B,T,1,V], one position per call (see the
  module docstring); self_mask is not used.
  """
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  max_len: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  scan: bool = False
  remat_policy: str = "none"
  decode: bool = False
  attention: str = "xla"  # common.Attention.implementation
  head_zeroinit: bool = True  # False: random head (learns the box readout faster, see below)

  @nn.compact
  def __call__(self, tokens, visual, self_mask, features_only: bool = False):
    """`features_only`: return the final-LayerNorm features [B,T,L,E] instead of the logits
    (the loss then applies the `head` params itself, chunk by chunk: `chunked_cross_entropy`).
    """
    if tokens.shape[-1] > self.max_len:
      raise ValueError(f"text length {tokens.shape[-1]} > decoder max_len {self.max_len}")
    if self.decode and tokens.shape[-1] != 1:
      raise ValueError(f"decode=True feeds one token per sequence per call: expected tokens "
                       f"[B, T, 1], got shape {tokens.shape}")
    embed = nn.Embed(self.vocab_size, self.width, name="embedding",
                     embedding_init=common.logical(
                         nn.initializers.normal(self.width ** -0.5), ("vocab", "embed")))
    mask_embedding = self.param("mask_embedding",
                                common.logical(nn.initializers.normal(self.width ** -0.5),
                                               ("embed",)), (self.width,), jnp.float32)
    is_mask = (tokens == MASK_ID)[..., None]
    x = jnp.where(is_mask, mask_embedding, embed(jnp.maximum(tokens, 0)))
    pos = self.param("pos_embedding",
                     common.logical(nn.initializers.normal(self.width ** -0.5),
                                    (None, "embed")), (self.max_len, self.width),
                     jnp.float32)
    if self.decode:
      is_initialized = self.has_variable("cache", "cache_index")
      index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      pos = jax.lax.dynamic_slice_in_dim(pos, index.value, 1)
      if is_initialized:  # the creating call feeds no token
        index.value = index.value + 1
    x = common.constrain((x + pos[:tokens.shape[-1]]).astype(self.dtype), ACT_BTLE)

    # Decoding computes no gradients: rematerialization would only cost time.
    run = common.stack(DecoderBlock, self.depth, scan=self.scan,
                       remat_policy="none" if self.decode else self.remat_policy,
                       num_broadcast_args=2)
    x = run(lambda cls, name: cls(self.num_heads, self.mlp_dim, self.use_bias, self.dtype,
                                  self.decode, self.max_len, self.attention, name=name),
            x, visual.astype(self.dtype), self_mask)
    x = common.layer_norm("decoder_norm", self.dtype)(x)
    if features_only:
      return x
    # Zero head: no gradient reaches the layers below until the head has grown. On the
    # box-readout toy a random head (head_zeroinit=False, configs/locca_b16.py:runlocal)
    # reaches 0.98-1.00 where the zero head reaches 0.15-0.50 in 600 steps
    # (docs/experiments/README.md, section 3).
    head_init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
    logits = nn.Dense(self.vocab_size, use_bias=self.use_bias, dtype=self.dtype, name="head",
                      kernel_init=common.logical(head_init, ("embed", "vocab")),
                      bias_init=common.logical(nn.initializers.zeros, ("vocab",)))(x)
    return common.constrain(logits, ("act_batch", None, "act_len", "act_vocab"))
