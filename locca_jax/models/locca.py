"""LocCa: ViT encoder + text decoder reading out captions and boxes.

B: batch (images), T: task sequences per image, L: text length, P: visual tokens,
E: encoder width, F: decoder width, V: vocabulary.

The encoder runs once per image; all of that image's task sequences (Cap, ARef, GCap)
cross-attend to the same visual tokens. Parameters live under `img/` (encoder, plus
`img_proj` when F != E) and `txt/` (decoder), so a transfer config can freeze `img/.*`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from locca_jax.models import common
from locca_jax.models import decoder as decoder_lib
from locca_jax.models import vit


class LocCa(nn.Module):
  """image [B,H,W,3], tokens [B,T,L], self_mask [B,T,L,L] or None (all rows causal)
  -> logits [B,T,L,V]."""
  encoder: dict[str, Any]  # kwargs of vit.ViT
  decoder: dict[str, Any]  # kwargs of decoder_lib.Decoder

  def setup(self):
    self.img = vit.ViT(**self.encoder, name="img")
    if self.decoder["width"] != self.encoder["width"]:
      self.img_proj = nn.Dense(self.decoder["width"], dtype=self.encoder["dtype"],
                               name="img_proj")
    else:
      self.img_proj = None
    self.txt = decoder_lib.Decoder(**self.decoder, name="txt")

  def encode(self, image):
    visual = self.img(image)  # [B, P, E]
    return visual if self.img_proj is None else self.img_proj(visual)

  def decode(self, tokens, visual, self_mask, features_only: bool = False):
    return self.txt(tokens, visual, self_mask, features_only)

  def __call__(self, image, tokens, self_mask, features_only: bool = False):
    """Logits [B,T,L,V], or with `features_only` the decoder's features [B,T,L,F]."""
    return self.decode(tokens, self.encode(image), self_mask, features_only)


def make_model(model_config: ml_collections.ConfigDict, vocab_size: int,
               max_len: int) -> LocCa:
  """Builds the model from `config.model` (see configs/locca_b16.py for the fields)."""
  dtype = jnp.dtype(model_config.get("dtype", "float32"))
  scan = model_config.get("scan", False)
  remat_policy = model_config.get("remat_policy", "none")
  enc_cfg = model_config.encoder
  enc = vit.decode_variant(enc_cfg.variant, **{
      k: enc_cfg.get(k) for k in ("width", "depth", "mlp_dim", "num_heads")})
  dec_cfg = model_config.decoder
  width = dec_cfg.get("width") or enc["width"]
  dec_heads = dec_cfg.get("num_heads") or enc["num_heads"]
  # One attention backend for the whole model; "auto" (the default) is cuDNN's fused kernel
  # on GPUs where it applies (common.attention_implementation).
  attention = common.attention_implementation(
      model_config.get("attention", "auto"), backend=jax.default_backend(), dtype=dtype,
      head_dims=(enc["width"] // enc["num_heads"], width // dec_heads))
  enc.update(posemb=enc_cfg.get("posemb", "learn"), stem=enc_cfg.get("stem", "patch"), pool="none", dtype=dtype, scan=scan,
             remat_policy=remat_policy, attention=attention)
  dec = dict(vocab_size=vocab_size, width=width, depth=dec_cfg.num_layers,
             mlp_dim=dec_cfg.get("mlp_dim") or 4 * width, num_heads=dec_heads,
             max_len=max_len, use_bias=dec_cfg.get("use_bias", True), dtype=dtype, scan=scan,
             remat_policy=remat_policy, attention=attention,
             head_zeroinit=bool(dec_cfg.get("head_zeroinit", True)))
  return LocCa(encoder=enc, decoder=dec)
