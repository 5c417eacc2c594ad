"""Issue 5 diagnostic: can the decoder learn WHICH object a prompt names, and where it is?

Images: 64 px grey with K squares (side 6-15 px, 2 px apart) of K distinct colours out of 6;
the prompt `[bos, colour token, ":"]` names one of them; target: its xmin pixel (64 classes),
read out at ":" as ARef reads a box coordinate. K = 0 draws K from {1, 2, 3} per image. The
encoder is the project's ViT (4 x 128, patch 8) with `posemb` learn or sincos2d; the readout
is the real 1-layer `Decoder` with a random head (`dec`), or one colour-embedding query
cross-attending to the visual tokens, then an MLP and a Dense (`pool`). Adam 1e-3, warmup 50,
cosine, batch 32, fresh images every step; printed: xmin within +-1 px on 256 fresh images.

  PYTHONPATH=. python docs/experiments/referring_toy.py K STEPS [SEED] [dec|pool] [learn|sincos2d]

Results: docs/experiments/README.md, section 4.
"""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from locca_jax.models import common
from locca_jax.models import decoder as decoder_lib
from locca_jax.models import vit

SIZE, BATCH, WIDTH, GAP = 64, 32, 128, 2
COLOURS = np.array([(0.8, -0.8, -0.8), (-0.8, 0.8, -0.8), (-0.8, -0.8, 0.8),
                    (0.8, 0.8, -0.8), (0.8, -0.8, 0.8), (-0.8, 0.8, 0.8)], np.float32)
COLOUR_TOKEN0 = 10   # prompt token of colour c: COLOUR_TOKEN0 + c


def _apart(y, x, side, placed):
  return all(x + side + GAP <= px or px + ps + GAP <= x or y + side + GAP <= py or
             py + ps + GAP <= y for py, px, ps in placed)


def make_batch(rng, n, k):
  """n images with k squares each (k 0: 1-3); the first square is the named target."""
  images = np.full((n, SIZE, SIZE, 3), -0.5, np.float32)
  xmin, colour = np.zeros(n, np.int32), np.zeros(n, np.int32)
  for i in range(n):
    colours = rng.permutation(len(COLOURS))[:k or rng.integers(1, 4)]
    placed = []
    for j, c in enumerate(colours):
      for _ in range(100):   # rejection sampling; the last draw is kept if none fits
        side = int(rng.integers(6, 16))
        y, x = (int(v) for v in rng.integers(0, SIZE - side, 2))
        if _apart(y, x, side, placed):
          break
      placed.append((y, x, side))
      images[i, y:y + side, x:x + side] = COLOURS[c]
      if j == 0:
        xmin[i], colour[i] = x, c
  return jnp.asarray(images), jnp.asarray(xmin), jnp.asarray(colour)


class Readout(nn.Module):
  mode: str
  posemb: str
  stem: str = "patch"

  @nn.compact
  def __call__(self, images, colour):
    visual = vit.ViT(width=WIDTH, depth=4, mlp_dim=4 * WIDTH, num_heads=4, patch_size=8,
                     posemb=self.posemb, stem=self.stem)(images)
    b = visual.shape[0]
    if self.mode == "pool":
      q = nn.Embed(COLOUR_TOKEN0 + len(COLOURS), WIDTH)(colour)[:, None]
      x = q + common.Attention(4)(nn.LayerNorm()(q), visual)
      x = x + common.MlpBlock(4 * WIDTH)(nn.LayerNorm()(x))
      return nn.Dense(SIZE)(nn.LayerNorm()(x))[:, 0]
    if self.mode != "dec":
      raise ValueError(f"mode {self.mode!r}: expected dec or pool")
    tokens = jnp.stack([jnp.zeros(b, jnp.int32), COLOUR_TOKEN0 + colour,
                        jnp.full(b, 3, jnp.int32)], -1)[:, None]
    logits = decoder_lib.Decoder(vocab_size=SIZE, width=WIDTH, depth=1, mlp_dim=4 * WIDTH,
                                 num_heads=4, max_len=8, head_zeroinit=False)(
                                     tokens, visual, None)
    return logits[:, 0, -1]


def adam_trainer(model: nn.Module, steps: int):
  """(tx, step) for the toys: Adam 1e-3, warmup 50, cosine to `steps`, on the cross-entropy of
  `model(images, colour)` against integer labels; `step(params, opt, images, labels, colour)`
  returns (params, opt, loss)."""
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0, 1e-3, 50, steps))

  @jax.jit
  def step(params, opt, images, labels, colour):
    def loss_fn(p):
      logits = model.apply(p, images, colour)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt, loss

  return tx, step


def main(k, steps, seed=0, mode="dec", posemb="learn"):
  rng = np.random.default_rng(seed)
  model = Readout(mode, posemb)
  images, _, colour = make_batch(rng, 2, k)
  params = nn.unbox(model.init(jax.random.key(seed), images, colour))
  tx, step = adam_trainer(model, steps)
  opt = tx.init(params)

  for s in range(1, steps + 1):
    params, opt, loss = step(params, opt, *make_batch(rng, BATCH, k))
    if s % max(1, steps // 10) == 0:
      images, xmin, colour = make_batch(rng, 256, k)
      pred = model.apply(params, images, colour).argmax(-1)
      acc = float((jnp.abs(pred - xmin) <= 1).mean())
      print(f"K={k} {mode} {posemb} step {s}: loss {float(loss):.3f}, xmin within 1 px "
            f"{acc:.3f}", flush=True)


if __name__ == "__main__":
  args = sys.argv[1:]
  main(int(args[0]), int(args[1]), int(args[2]) if len(args) > 2 else 0,
       args[3] if len(args) > 3 else "dec", args[4] if len(args) > 4 else "learn")
