"""Issue 5 diagnostic: which part of encoder + readout learns a small object's shape slowly?

The one-object images of `background_toy.py` with every factor at locca_shapes' own setting
(64 px, locca_shapes backgrounds, shape masks, colours and sizes); the label is the object's shape
(6 classes, chance 1/6). Features and readout are switched independently:

  FEATURES  cnn:       `vit.ConvStem` alone (3 stages of 3x3 conv + 3x3 stride-2 conv, GELU,
                       then 1x1 to 128): an 8 x 8 grid of 128-d tokens, nothing else
            vit_conv:  the project's ViT (4 x 128, sincos2d) on that conv stem
            vit_patch: the project's ViT (4 x 128, sincos2d) with its linear 8 x 8 patches
  READOUT   max:  global max over the tokens, then Dense (a CNN classifier's pooling)
            mean: mean over the tokens, then Dense
            attn: one learned query (per prompt colour) attending to the tokens (softmax),
                  then Dense-GELU-Dense: cross-attention pooling, the decoder's mechanism
            dec:  the real 1-layer `Decoder` (random head) read out at ":" of
                  `[bos, colour token, ":"]`, as in background_toy.py

Adam 1e-3, warmup 50, cosine, batch 32, fresh images every step; printed: shape accuracy on
256 fresh images at each quarter of the run.

  PYTHONPATH=. .venv/bin/python docs/experiments/readout_decomposition.py FEATURES READOUT \
      [STEPS] [SEED]

Results: docs/experiments/README.md, section 8.
"""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from docs.experiments import background_toy
from docs.experiments import referring_toy
from locca_jax.models import decoder as decoder_lib
from locca_jax.models import vit

WIDTH, PATCH, NUM_SHAPES = 128, 8, 6


class ShapeReadout(nn.Module):
  features: str
  readout: str

  @nn.compact
  def __call__(self, images, colour):  # images: uint8 [B, 64, 64, 3]; colour: int [B]
    if self.features == "cnn":
      grid = vit.ConvStem(WIDTH, PATCH)(images.astype(jnp.float32) * (2.0 / 255.0) - 1.0)
      tokens = grid.reshape(grid.shape[0], -1, WIDTH)
    elif self.features in ("vit_conv", "vit_patch"):
      tokens = vit.ViT(width=WIDTH, depth=4, mlp_dim=4 * WIDTH, num_heads=4, patch_size=PATCH,
                       posemb="sincos2d", stem=self.features[4:])(images)
    else:
      raise ValueError(f"features {self.features!r}: expected cnn, vit_conv or vit_patch")
    if self.readout == "max":
      return nn.Dense(NUM_SHAPES)(tokens.max(axis=1))
    if self.readout == "mean":
      return nn.Dense(NUM_SHAPES)(tokens.mean(axis=1))
    if self.readout == "attn":
      query = nn.Embed(referring_toy.COLOUR_TOKEN0 + 6, WIDTH)(colour)[:, None]
      keys, values = nn.Dense(WIDTH)(tokens), nn.Dense(WIDTH)(tokens)
      weights = jax.nn.softmax(jnp.einsum("bqe,bke->bqk", query, keys) / WIDTH ** 0.5, axis=-1)
      pooled = jnp.einsum("bqk,bke->bqe", weights, values)[:, 0]
      return nn.Dense(NUM_SHAPES)(nn.gelu(nn.Dense(WIDTH)(pooled)))
    if self.readout == "dec":
      b = tokens.shape[0]
      prompt = jnp.stack([jnp.zeros(b, jnp.int32), referring_toy.COLOUR_TOKEN0 + colour,
                          jnp.full(b, 3, jnp.int32)], -1)[:, None]
      logits = decoder_lib.Decoder(vocab_size=64, width=WIDTH, depth=1, mlp_dim=4 * WIDTH,
                                   num_heads=4, max_len=8, head_zeroinit=False)(
                                       prompt, tokens, None)
      return logits[:, 0, -1, :NUM_SHAPES]
    raise ValueError(f"readout {self.readout!r}: expected max, mean, attn or dec")


def examples(rng, n):
  return background_toy.make_examples(rng, n, "real", "real", "real", "shape")


def main(features, readout, steps=400, seed=0):
  rng = np.random.default_rng(seed)
  model = ShapeReadout(features, readout)
  images, _, colours = examples(rng, 2)
  params = nn.unbox(model.init(jax.random.key(seed), images, colours))
  tx, step = referring_toy.adam_trainer(model, steps)
  opt = tx.init(params)
  accuracies = []
  for s in range(1, steps + 1):
    images, labels, colours = examples(rng, referring_toy.BATCH)
    params, opt, _ = step(params, opt, images, labels, colours)
    if s % max(1, steps // 4) == 0:
      images, labels, colours = examples(rng, 256)
      pred = np.asarray(model.apply(params, images, colours).argmax(-1))
      accuracies.append(f"{float((pred == labels).mean()):.2f} ({s})")
  print(f"{features} {readout} seed {seed}: shape accuracy " + ", ".join(accuracies), flush=True)


if __name__ == "__main__":
  a = sys.argv[1:]
  main(a[0], a[1], int(a[2]) if len(a) > 2 else 400, int(a[3]) if len(a) > 3 else 0)
