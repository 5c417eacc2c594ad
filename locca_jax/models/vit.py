"""Vision Transformer encoder (big_vision layout).

B: batch, Hi/Wi: image height/width, P: patches (visual tokens), E: width.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from locca_jax.models import common

# variant -> (width, depth, mlp_dim, heads); "Ti/16" = tiny, patch 16.
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
}


def decode_variant(variant: str, **overrides) -> dict[str, Any]:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16).

  Explicit `overrides` (e.g. depth=4 for a tiny model) win over the variant's values.
  """
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or not patch.isdigit():
    raise ValueError(f"ViT variant {variant!r}: expected NAME/PATCH with NAME in "
                     f"{sorted(VARIANTS)}, e.g. 'B/16'")
  width, depth, mlp_dim, heads = VARIANTS[name]
  spec = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
              patch_size=int(patch))
  spec.update({k: v for k, v in overrides.items() if v is not None})
  return spec


class EncoderBlock(nn.Module):
  """Pre-LN block: x + MHSA(LN(x)); x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  attention: str = "xla"  # common.Attention.implementation

  @nn.compact
  def __call__(self, x):  # x: [B, P, E]
    y = common.layer_norm("ln_attn", self.dtype)(x)
    x = x + common.Attention(self.num_heads, dtype=self.dtype, implementation=self.attention,
                             name="attn")(y, y)
    y = common.layer_norm("ln_mlp", self.dtype)(x)
    x = x + common.MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y)
    return common.constrain(x, common.ACT_BTE)


class ConvStem(nn.Module):
  """Image [B, Hi, Wi, 3] -> patch grid [B, Hi/p, Wi/p, E]: log2(p) stages of a 3x3 convolution
  and a 3x3 stride-2 convolution (each GELU; channels doubling from E/p*2 up to E), then a
  1x1 convolution to E.

  In place of the one linear p x p patch embedding (Xiao et al. 2021, "Early convolutions help
  transformers see better"): it reads detail inside a patch at every alignment, which a tiny
  ViT at low resolution otherwise learns very slowly (docs/experiments/README.md, section 8).
  """
  width: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image):
    p = self.patch_size
    if p < 2 or p & (p - 1):
      raise ValueError(f"stem 'conv' needs a power-of-two patch size >= 2, got {p}")
    num_stages = p.bit_length() - 1
    # Stem channels are replicated (None): they need not divide the mesh's embed axis.
    init = common.logical(nn.initializers.lecun_normal(), (None, None, None, None))
    x = image
    for k in range(num_stages):
      channels = max(self.width >> (num_stages - 1 - k), 8)
      for stride in (1, 2):
        x = nn.Conv(channels, (3, 3), strides=(stride, stride), padding="SAME",
                    dtype=self.dtype, name=f"conv{k}_{stride}", kernel_init=init,
                    bias_init=common.logical(nn.initializers.zeros, (None,)))(x)
        x = nn.gelu(x)
    return nn.Conv(self.width, (1, 1), dtype=self.dtype, name="embedding",
                   kernel_init=common.logical(nn.initializers.lecun_normal(),
                                              (None, None, None, "embed")),
                   bias_init=common.logical(nn.initializers.zeros, ("embed",)))(x)


class ViT(nn.Module):
  """Image [B, Hi, Wi, 3] -> visual tokens [B, P, E] (pool="none") or [B, E] (pool="gap").

  The image is uint8 pixels (what the input pipelines yield; mapped to [-1, 1] here, fused into
  the jitted step) or a float image already in [-1, 1].
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  posemb: str = "learn"  # or "sincos2d"
  stem: str = "patch"  # "patch": one linear p x p patch embedding; "conv": ConvStem
  pool: str = "none"
  dtype: Any = jnp.float32
  scan: bool = False
  remat_policy: str = "none"
  attention: str = "xla"  # common.Attention.implementation

  @nn.compact
  def __call__(self, image):
    p = self.patch_size
    if image.dtype == jnp.uint8:
      image = image.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    if self.stem == "patch":
      x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                  name="embedding",
                  kernel_init=common.logical(nn.initializers.lecun_normal(),
                                             (None, None, None, "embed")),
                  bias_init=common.logical(nn.initializers.zeros, ("embed",)))(image)
    elif self.stem == "conv":
      x = ConvStem(self.width, p, self.dtype, name="stem")(image)
    else:
      raise ValueError(f"stem {self.stem!r}: expected 'patch' or 'conv'")
    b, h, w, e = x.shape
    x = x.reshape(b, h * w, e)
    if self.posemb == "learn":
      pos = self.param("pos_embedding",
                       common.logical(nn.initializers.normal(1 / e ** 0.5),
                                      (None, None, "embed")), (1, h * w, e), jnp.float32)
    elif self.posemb == "sincos2d":
      pos = common.posemb_sincos_2d(h, w, e)
    else:
      raise ValueError(f"posemb {self.posemb!r}: expected 'learn' or 'sincos2d'")
    x = common.constrain((x + pos).astype(self.dtype), common.ACT_BTE)

    run = common.stack(EncoderBlock, self.depth, scan=self.scan,
                       remat_policy=self.remat_policy, num_broadcast_args=0)
    x = run(lambda cls, name: cls(self.num_heads, self.mlp_dim, self.dtype, self.attention,
                                  name=name), x)
    x = common.layer_norm("encoder_norm", self.dtype)(x)
    if self.pool == "gap":
      return x.mean(axis=1)
    if self.pool != "none":
      raise ValueError(f"pool {self.pool!r}: expected 'none' or 'gap'")
    return x
