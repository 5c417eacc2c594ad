"""Issue 5 diagnostic: how fast can each readout learn WHERE one red square is?

Images: 64 px grey, one red square of side 6-15 px at a random place; target: its xmin pixel
(64 classes). The same ViT (4 x 128, patch 8) feeds one of these readouts, trained with Adam
(1e-3, warmup 50, cosine) at batch 32; printed: accuracy within +-1 px on 256 fresh images.
  flat   Dense over the flattened visual tokens (no attention)
  pool   one learned query cross-attending (common.Attention), then Dense
  block  pool plus the decoder block's pieces around it (pre-LN self-attention, residuals,
         pre-LN MLP, final LayerNorm), built here from common layers
  dec1 / dec2  the real decoder_lib.Decoder (1 / 2 layers) on tokens [bos, prompt, ":"],
         reading out at ":" exactly as ARef does

  python docs/experiments/readout_toy.py MODE [STEPS]
Measured (2-core CPU, 600 steps, deterministic; docs/experiments/README.md): flat 1.00 (0.98
at step 300), pool 1.00, block 0.91, dec1 0.15, dec2 0.32.
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

SIZE, BATCH, WIDTH = 64, 32, 128


def make_batch(rng, n):
  images = np.full((n, SIZE, SIZE, 3), -0.5, np.float32)
  xmin = np.zeros(n, np.int32)
  for i in range(n):
    side = rng.integers(6, 16)
    y, x = rng.integers(0, SIZE - side, 2)
    images[i, y:y + side, x:x + side] = (0.8, -0.8, -0.8)
    xmin[i] = x
  return jnp.asarray(images), jnp.asarray(xmin)


class Readout(nn.Module):
  mode: str

  @nn.compact
  def __call__(self, images):
    visual = vit.ViT(width=WIDTH, depth=4, mlp_dim=4 * WIDTH, num_heads=4, patch_size=8)(images)
    b = visual.shape[0]
    if self.mode == "flat":
      return nn.Dense(SIZE)(visual.reshape(b, -1))
    if self.mode.startswith("dec"):
      tokens = jnp.broadcast_to(jnp.asarray([0, 2, 3], jnp.int32), (b, 1, 3))
      logits = decoder_lib.Decoder(vocab_size=SIZE, width=WIDTH, depth=int(self.mode[3:]),
                                   mlp_dim=4 * WIDTH, num_heads=4, max_len=8)(
                                       tokens, visual, None)
      return logits[:, 0, -1]
    embed = self.param("embed", nn.initializers.normal(WIDTH ** -0.5), (1, 1, WIDTH))
    x = jnp.broadcast_to(embed, (b, 1, WIDTH))
    if self.mode == "pool":
      return nn.Dense(SIZE)((x + common.Attention(4)(nn.LayerNorm()(x), visual))[:, 0])
    if self.mode != "block":
      raise ValueError(f"mode {self.mode!r}: expected flat, pool, block, dec1 or dec2")
    y = nn.LayerNorm()(x)
    x = x + common.Attention(4)(y, y)
    x = x + common.Attention(4)(nn.LayerNorm()(x), visual)
    x = x + common.MlpBlock(4 * WIDTH)(nn.LayerNorm()(x))
    return nn.Dense(SIZE)(nn.LayerNorm()(x)[:, 0])


def main(mode, steps=600):
  rng = np.random.default_rng(0)
  model = Readout(mode)
  params = nn.unbox(model.init(jax.random.key(0), make_batch(rng, 2)[0]))
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0, 1e-3, 50, steps))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, images, xmin):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, images), xmin).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt, loss

  for s in range(1, steps + 1):
    params, opt, loss = step(params, opt, *make_batch(rng, BATCH))
    if s % (steps // 6) == 0:
      images, xmin = make_batch(rng, 256)
      acc = float((jnp.abs(model.apply(params, images).argmax(-1) - xmin) <= 1).mean())
      print(f"{mode} step {s}: loss {float(loss):.3f}, xmin within 1 px {acc:.3f}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 600)
