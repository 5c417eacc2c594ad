"""Analytic model FLOPs of LocCa, for MFU. Imports no TensorFlow.

Counts the matrix multiplications only (2·m·n·k each), as executed: attention scores over the
full L×L (the causal half is computed and masked), cross-attention keys/values projected once
per image. Training = 3 × forward (backward costs two matmuls per forward matmul); remat
recomputation is not counted, as MFU requires.

B: batch, P: visual tokens, E: encoder width, F: decoder width, T: task rows per image,
L: text length, V: vocabulary.
"""
from locca_jax.models import locca as locca_lib


def forward_flops_per_image(model: locca_lib.LocCa, image_size: int, num_rows: int,
                            seq_len: int) -> int:
  enc, dec = model.encoder, model.decoder
  p, e, f = enc["patch_size"], enc["width"], dec["width"]
  num_patches = (image_size // p) ** 2
  flops = 2 * num_patches * p * p * 3 * e  # patch embedding
  per_layer = (2 * num_patches * 4 * e * e  # q, k, v, out projections
               + 2 * 2 * num_patches * num_patches * e  # scores and weighted values
               + 2 * 2 * num_patches * e * enc["mlp_dim"])  # MLP
  flops += enc["depth"] * per_layer
  if f != e:
    flops += 2 * num_patches * e * f  # img_proj
  tokens = num_rows * seq_len  # all rows of one image
  per_layer = (2 * tokens * 4 * f * f  # self-attention projections
               + 2 * 2 * num_rows * seq_len * seq_len * f  # self-attention
               + 2 * tokens * 2 * f * f + 2 * num_patches * 2 * f * f  # cross q/out, k/v
               + 2 * 2 * tokens * num_patches * f  # cross-attention
               + 2 * 2 * tokens * f * dec["mlp_dim"])  # MLP
  flops += dec["depth"] * per_layer
  flops += 2 * tokens * f * dec["vocab_size"]  # logits
  return flops


def train_flops_per_image(model: locca_lib.LocCa, image_size: int, num_rows: int,
                          seq_len: int) -> int:
  return 3 * forward_flops_per_image(model, image_size, num_rows, seq_len)
