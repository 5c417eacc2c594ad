"""Issue 5 diagnostic: which property of locca_shapes images stops the box readout?

One object per 64 px image; target: its xmin pixel (64 classes), read out at ":" of
`[bos, colour token, ":"]` by the real 1-layer `Decoder` (random head) over the project's ViT
(4 x 128, patch 8), as in `referring_toy.py` with K = 1. Each factor is toy or locca_shapes:

  bg      grey: uint8 64 everywhere | solid: one of locca_shapes' 6 levels | gradient | noise
          | real: locca_shapes' own mix (solid, solid, gradient, noise)
  shape   square | real: one of locca_shapes' 6 shape masks
  colour  toy: saturated primaries | real: locca_shapes' RGB values
  size    toy: side 6-15 px | real: locca_shapes' small / large extents

Uint8 pixels, as the pipeline yields. Adam 1e-3, warmup 50, cosine, batch 32, fresh images every
step; printed: xmin within +-1 px on 256 fresh images. TARGET=shape (with SHAPE=real) reads
out the object's shape instead (6 classes, exact): how fast this encoder learns shapes at all.

  PYTHONPATH=. python docs/experiments/background_toy.py BG SHAPE COLOUR STEPS [SEED] [POSEMB] \
      [TARGET] [STEM]

Results: docs/experiments/README.md, sections 5 (xmin) and 7 (shape).
"""
import sys

import flax.linen as nn
import jax
import numpy as np

from docs.experiments import referring_toy
from locca_jax.data import locca_shapes

SIZE, BATCH = referring_toy.SIZE, referring_toy.BATCH
TOY_RGB = np.array([(230, 25, 25), (25, 230, 25), (25, 25, 230), (230, 230, 25),
                    (230, 25, 230), (25, 230, 230)], np.uint8)
REAL_RGB = np.array([locca_shapes._RGB[c] for c in locca_shapes.COLORS], np.uint8)
LEVELS = np.array(list(locca_shapes._BACKGROUNDS.values()), np.uint8)


def background(rng, kind):
  if kind == "grey":
    return np.full((SIZE, SIZE, 3), 64, np.uint8)
  if kind == "solid":
    return np.broadcast_to(LEVELS[rng.integers(len(LEVELS))], (SIZE, SIZE, 3)).copy()
  if kind == "real":
    return locca_shapes._background(rng, SIZE)[0]
  for _ in range(1000):   # draw locca_shapes backgrounds until one is of the asked kind
    img, phrase = locca_shapes._background(rng, SIZE)
    if (kind == "gradient") == ("gradient" in phrase) and (kind == "noise") == ("noisy" in phrase):
      return img
  raise ValueError(f"bg {kind!r}: expected grey, solid, gradient, noise or real")


def make_batch(rng, n, bg, shape, colour):
  images = np.empty((n, SIZE, SIZE, 3), np.uint8)
  xmin, colours, kinds = (np.zeros(n, np.int32) for _ in range(3))
  for i in range(n):
    images[i] = background(rng, bg)
    if shape == "square":
      side = int(rng.integers(6, 16))
      mask = np.ones((side, side), bool)
    else:
      kinds[i] = rng.integers(len(locca_shapes.SHAPES))
      lo, hi = locca_shapes._SIZE_RANGE[locca_shapes.SIZES[rng.integers(2)]]
      mask = locca_shapes._shape_mask(locca_shapes.SHAPES[kinds[i]],
                                      round(rng.uniform(lo, hi) * SIZE * 4) / 4)
    h, w = mask.shape
    y, x = int(rng.integers(0, SIZE - h + 1)), int(rng.integers(0, SIZE - w + 1))
    c = int(rng.integers(6))
    images[i, y:y + h, x:x + w][mask] = (TOY_RGB if colour == "toy" else REAL_RGB)[c]
    xmin[i], colours[i] = x, c
  return images, xmin, colours, kinds


def make_examples(rng, n, bg, shape, colour, target):
  """(images, labels, colours): labels are xmin pixels or shape indices (`target`)."""
  images, xmin, colours, kinds = make_batch(rng, n, bg, shape, colour)
  if target not in ("xmin", "shape") or (target == "shape" and shape != "real"):
    raise ValueError(f"target {target!r} with shape {shape!r}: expected xmin, or shape with "
                     "the real masks")
  return images, (xmin if target == "xmin" else kinds), colours


def main(bg, shape, colour, steps, seed=0, posemb="sincos2d", target="xmin", stem="patch"):
  rng = np.random.default_rng(seed)
  model = referring_toy.Readout("dec", posemb, stem)
  images, _, colours = make_examples(rng, 2, bg, shape, colour, target)
  params = nn.unbox(model.init(jax.random.key(seed), images, colours))
  tx, step = referring_toy.adam_trainer(model, steps)
  opt = tx.init(params)

  for s in range(1, steps + 1):
    params, opt, loss = step(params, opt,
                             *make_examples(rng, BATCH, bg, shape, colour, target))
    if s % max(1, steps // 6) == 0:
      images, labels, colours = make_examples(rng, 256, bg, shape, colour, target)
      pred = np.asarray(model.apply(params, images, colours).argmax(-1))
      tolerance, what = (1, "xmin within 1 px") if target == "xmin" else (0, "shape accuracy")
      acc = float((np.abs(pred - labels) <= tolerance).mean())
      print(f"bg={bg} shape={shape} colour={colour} {posemb} step {s}: loss {float(loss):.3f},"
            f" {what} {acc:.3f}", flush=True)


if __name__ == "__main__":
  a = sys.argv[1:]
  main(a[0], a[1], a[2], int(a[3]), int(a[4]) if len(a) > 4 else 0,
       a[5] if len(a) > 5 else "sincos2d", a[6] if len(a) > 6 else "xmin",
       a[7] if len(a) > 7 else "patch")
