"""Attention backends: the causal flag vs an explicit mask, and the backend choice."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locca_jax.models import common
from locca_jax.models import decoder as decoder_lib


def _reference_attention(q, k, v, mask):
  """float64 numpy softmax(q k^T / sqrt(d)) v, q/k/v [B, S, H, D], mask [S, S] bool."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def test_causal_flag_equals_the_causal_mask_and_a_numpy_reference():
  attn = common.Attention(num_heads=2)
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  params = nn.unbox(attn.init(jax.random.key(1), x, x))
  causal = jnp.tril(jnp.ones((5, 5), bool))
  with_flag = attn.apply(params, x, x, is_causal=True)
  with_mask = attn.apply(params, x, x, mask=causal[None, None])
  np.testing.assert_allclose(with_flag, with_mask, atol=1e-6)
  # The same through float64 numpy from the module's own projections.
  p = params["params"]
  proj = lambda n: np.einsum("bse,ehd->bshd", x, p[f"{n}_kernel"]) + p[f"{n}_bias"]
  out = _reference_attention(proj("query"), proj("key"), proj("value"), np.asarray(causal))
  ref = np.einsum("bqhd,hde->bqe", out, p["out_kernel"]) + p["out_bias"]
  np.testing.assert_allclose(with_flag, ref, atol=1e-5)
  with pytest.raises(ValueError, match="either a mask or is_causal"):
    attn.apply(params, x, x, mask=causal[None, None], is_causal=True)


def test_decoder_without_parallel_rows_builds_no_mask_and_matches_the_masked_decoder():
  text = jnp.asarray([[[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]]], jnp.int32)  # [B=1, T=2, L=5]
  tokens_none, mask_none = decoder_lib.decoder_inputs(text)
  tokens, mask = decoder_lib.decoder_inputs(text, jnp.zeros((1, 2), bool))
  assert mask_none is None
  np.testing.assert_array_equal(tokens_none, tokens)
  dec = decoder_lib.Decoder(vocab_size=12, width=16, depth=2, mlp_dim=32, num_heads=2,
                            max_len=5)
  visual = jax.random.normal(jax.random.key(2), (1, 4, 16))
  params = nn.unbox(dec.init(jax.random.key(3), tokens, visual, mask))
  # A non-zero head, so that the logits depend on everything below them.
  params = jax.tree_util.tree_map(lambda a: a + 0.01, params)
  np.testing.assert_allclose(dec.apply(params, tokens, visual, None),
                             dec.apply(params, tokens, visual, mask), atol=1e-5)


@pytest.mark.parametrize("requested,backend,dtype,head_dims,expected", [
    ("auto", "gpu", jnp.bfloat16, (64, 64), "cudnn"),
    ("auto", "gpu", jnp.float16, (128, 8), "cudnn"),
    ("auto", "cpu", jnp.bfloat16, (64, 64), "xla"),
    ("auto", "gpu", jnp.float32, (64, 64), "xla"),     # cuDNN flash attention: 16-bit only
    ("auto", "gpu", jnp.bfloat16, (64, 12), "xla"),    # head dim not a multiple of 8
    ("auto", "gpu", jnp.bfloat16, (256, 64), "xla"),   # head dim above 128
    ("auto", "tpu", jnp.bfloat16, (64, 64), "xla"),
    ("xla", "gpu", jnp.bfloat16, (64, 64), "xla"),
    ("cudnn", "gpu", jnp.bfloat16, (64, 64), "cudnn"),
])
def test_attention_implementation_choice(requested, backend, dtype, head_dims, expected):
  assert common.attention_implementation(requested, backend=backend, dtype=dtype,
                                         head_dims=head_dims) == expected


def test_explicit_cudnn_where_it_cannot_run_is_an_error_with_the_reasons():
  with pytest.raises(ValueError, match=r"backend is 'cpu'.*float32.*\[12\]"):
    common.attention_implementation("cudnn", backend="cpu", dtype=jnp.float32,
                                    head_dims=(12, 64))
  with pytest.raises(ValueError, match="expected one of"):
    common.attention_implementation("flash", backend="gpu", dtype=jnp.bfloat16,
                                    head_dims=(64,))
