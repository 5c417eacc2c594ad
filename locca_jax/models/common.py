"""Layers shared by the encoder and the decoder.

B: batch, Q: query length, K: key length, E: width, H: heads, D: head dim, M: MLP hidden units,
C: cache length (autoregressive decoding, see `Attention`).

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...) and
activations are constrained with `act_*` names; `locca_jax.sharding.LOGICAL_RULES` maps both to
the mesh, so the same module runs data-, FSDP- or tensor-parallel without change.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

ACT_BTE = ("act_batch", "act_len", "act_embed")

_REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def logical(init_fn: Callable, names: tuple) -> Callable:
  return nn.with_logical_partitioning(init_fn, names)


def constrain(x: jax.Array, names: tuple) -> jax.Array:
  return nn.with_logical_constraint(x, names)


class MlpBlock(nn.Module):
  """Transformer MLP: Dense(M) -> GELU -> Dense(E)."""
  mlp_dim: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: [..., E]
    width = x.shape[-1]
    init = nn.initializers.xavier_uniform()
    h = nn.Dense(self.mlp_dim, use_bias=self.use_bias, dtype=self.dtype,
                 kernel_init=logical(init, ("embed", "mlp")),
                 bias_init=logical(nn.initializers.normal(1e-6), ("mlp",)))(x)
    h = nn.gelu(h)
    h = constrain(h, ("act_batch",) + (None,) * (h.ndim - 2) + ("act_mlp",))
    return nn.Dense(width, use_bias=self.use_bias, dtype=self.dtype,
                    kernel_init=logical(init, ("mlp", "embed")),
                    bias_init=logical(nn.initializers.normal(1e-6), ("embed",)))(h)


class Attention(nn.Module):
  """Multi-head attention through `jax.nn.dot_product_attention`.

  `mask` is boolean, broadcastable to [B, H, Q, K], True where a query may attend;
  `is_causal` (with `mask` None) is the causal mask, given as a flag so that fused kernels
  apply it without materializing [Q, K].

  `implementation` is `jax.nn.dot_product_attention`'s backend: "xla" (any device, any mask)
  or "cudnn" (fused flash attention on NVIDIA GPUs: bf16/fp16, head dim a multiple of 8 and
  <= 128; `attention_implementation` picks it where it applies). Cached decoding always uses
  "xla": its per-step mask over the cache is a general mask.

  `kv_cache` selects autoregressive decoding with a "cache" variable collection (Flax idiom: the
  first call, made with the collection mutable and absent, creates it; later calls read and
  update it). C: cache length.
    "none": no cache (training, the encoder).
    "append": self-attention, one query token per call. `cached_key` / `cached_value`
      [B, C, H, D] (C = `cache_len`) receive this token's key / value at `cache_index` (int32
      scalar, then incremented); the query attends to cache positions <= that index. The
      creating call only allocates the (zero) cache, its output is meaningless.
    "static": cross-attention to inputs that do not change while decoding (the visual tokens):
      their keys / values [B, K, H, D] are projected once, by the creating call, and reused;
      later calls ignore `x_kv`.
  """
  num_heads: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kv_cache: str = "none"  # "none" | "append" | "static", see above
  cache_len: int = 0  # C, for kv_cache="append"
  implementation: str = "xla"  # "xla" | "cudnn", see above

  @nn.compact
  def __call__(self, x_q, x_kv, mask=None, is_causal: bool = False):
    # x_q: [B, Q, E], x_kv: [B, K, E]
    width = x_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    def proj(name, x):  # [B, *, E] -> [B, *, H, D]
      kernel = self.param(f"{name}_kernel", logical(
          nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0,
                                           out_axis=(1, 2)), ("embed", "heads", "kv")),
                          (width, self.num_heads, head_dim), jnp.float32)
      y = jnp.einsum("bse,ehd->bshd", x.astype(self.dtype), kernel.astype(self.dtype))
      if self.use_bias:
        y += self.param(f"{name}_bias", logical(nn.initializers.zeros, ("heads", "kv")),
                        (self.num_heads, head_dim), jnp.float32).astype(self.dtype)
      return y
    names = ("act_batch", "act_len", "act_heads", None)
    q = constrain(proj("query", x_q), names)
    if self.kv_cache == "static":
      # Projected only when the cache is created: the lambdas never run on later calls.
      k = self.variable("cache", "cached_key", lambda: constrain(proj("key", x_kv), names)).value
      v = self.variable("cache", "cached_value",
                        lambda: constrain(proj("value", x_kv), names)).value
    else:
      k = constrain(proj("key", x_kv), names)
      v = constrain(proj("value", x_kv), names)
    implementation = self.implementation
    if self.kv_cache == "append":
      k, v, mask = self._append_to_cache(k, v, mask)
      is_causal = False  # the cache mask carries causality
    elif self.kv_cache not in ("none", "static"):
      raise ValueError(f"kv_cache {self.kv_cache!r}: expected 'none', 'append' or 'static'")
    if self.kv_cache != "none":
      implementation = "xla"  # decoding: see the class docstring
    if is_causal and mask is not None:
      raise ValueError("Attention: pass either a mask or is_causal=True, not both")
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                       implementation=implementation)  # [B, Q, H, D]
    kernel = self.param("out_kernel", logical(
        nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1),
                                         out_axis=2), ("heads", "kv", "embed")),
                        (self.num_heads, head_dim, width), jnp.float32)
    y = jnp.einsum("bqhd,hde->bqe", out, kernel.astype(self.dtype))
    if self.use_bias:
      y += self.param("out_bias", logical(nn.initializers.zeros, ("embed",)), (width,),
                      jnp.float32).astype(self.dtype)
    return y

  def _append_to_cache(self, k, v, mask):
    """Writes this token's k, v [B, 1, H, D] at `cache_index`; returns the cached [B, C, H, D]."""
    b, q_len, h, d = k.shape
    if self.cache_len < 1:
      raise ValueError(f"kv_cache='append' needs cache_len >= 1, got {self.cache_len}")
    is_initialized = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, (b, self.cache_len, h, d),
                             k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, (b, self.cache_len, h, d),
                             v.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not is_initialized:
      return k, v, mask
    if q_len != 1 or cached_k.value.shape[0] != b:
      raise ValueError(f"cached decoding takes one token per call for the batch of {b} the "
                       f"cache was created for; got keys of shape {k.shape} for a cache of "
                       f"shape {cached_k.value.shape}")
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0))
    index.value = i + 1
    visible = (jnp.arange(self.cache_len) <= i)[None, None, None, :]  # [1, 1, 1, C]
    mask = visible if mask is None else mask & visible
    return cached_k.value, cached_v.value, mask


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention_implementation(requested: str, *, backend: str, dtype: Dtype,
                             head_dims: tuple[int, ...]) -> str:
  """`config.model.attention` -> the backend every `Attention` of the model uses.

  "auto" takes cuDNN's fused attention where it applies (a GPU backend, bf16/fp16 compute,
  every head dim a multiple of 8 and <= 128) and XLA's otherwise; "cudnn" where it does not
  apply is an error naming the reason, not a silent fallback.
  """
  if requested not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"model.attention {requested!r}: expected one of "
                     f"{ATTENTION_IMPLEMENTATIONS}")
  if requested == "xla":
    return "xla"
  reasons = []
  if backend != "gpu":
    reasons.append(f"backend is {backend!r}, not 'gpu'")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    reasons.append(f"compute dtype is {jnp.dtype(dtype).name}, not bfloat16/float16")
  bad = sorted({d for d in head_dims if d % 8 or d > 128})
  if bad:
    reasons.append(f"head dims {bad} are not multiples of 8 in [8, 128]")
  if not reasons:
    return "cudnn"
  if requested == "cudnn":
    raise ValueError("model.attention='cudnn' does not apply: " + "; ".join(reasons) +
                     " (use 'auto' to fall back to 'xla' there)")
  return "xla"


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(name=name, dtype=dtype,
                      scale_init=logical(nn.initializers.ones, ("embed",)),
                      bias_init=logical(nn.initializers.zeros, ("embed",)))


def stack(block: type[nn.Module], num_layers: int, *, scan: bool, remat_policy: str,
          num_broadcast_args: int) -> Callable:
  """Returns `apply(parent, x, *args) -> x` running `num_layers` copies of `block`.

  With `scan`, the layers are one `nn.scan` over a stacked parameter axis (logical name
  `layers`): compile time independent of depth. `remat_policy` ("none" or a
  `jax.checkpoint_policies` name) trades recomputation for activation memory.
  """
  if remat_policy != "none":
    if remat_policy not in _REMAT_POLICIES:
      raise ValueError(f"remat_policy {remat_policy!r}: expected 'none' or one of "
                       f"{sorted(_REMAT_POLICIES)}")
    block = nn.remat(block, policy=_REMAT_POLICIES[remat_policy], prevent_cse=not scan)

  def apply(make_block: Callable[..., nn.Module], x, *args):
    if scan:
      def body(layer, carry, *broadcast):
        return layer(carry, *broadcast), None
      # "cache" (decoding, see Attention) gets the same stacked layer axis as the params.
      scanned = nn.scan(body, variable_axes={"params": 0, "cache": 0},
                        split_rngs={"params": True},
                        in_axes=(nn.broadcast,) * num_broadcast_args, length=num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(make_block(block, "layers"), x, *args)
      return x
    for i in range(num_layers):
      x = make_block(block, f"layer_{i}")(x, *args)
    return x

  return apply


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype=jnp.float32) -> jax.Array:
  """Fixed 2-D sin-cos position embedding (MoCo v3 / big_vision), [1, h*w, width]."""
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs width % 4 == 0, got {width}")
  y, x = np.mgrid[:h, :w]
  omega = 1. / (temperature ** (np.arange(width // 4) / (width // 4 - 1)))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe[None], dtype)
