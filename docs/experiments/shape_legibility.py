"""Issue 5 diagnostic: can locca_shapes' six shapes be told apart at the 64 px model input?

Renders each shape mask at locca_shapes' 128 px (its size ranges, random 1 px offset), halves
the resolution by 2 x 2 area averaging (what the pipeline's antialiased squash resize does to
128 -> 64 px), crops each rendering to its bounding box, and reports the leave-one-out 1-NN
shape accuracy over 60 renderings per shape and size. An upper bound on legibility given the
box (a model must also find the object), not a model.

  PYTHONPATH=. .venv/bin/python docs/experiments/shape_legibility.py

Results: docs/experiments/README.md, section 6.
"""
import numpy as np

from locca_jax.data import locca_shapes

CANVAS, CROP, PER_SHAPE = 48, 24, 60   # 128 px pixels; 64 px pixels; renderings per shape


def render_64px(kind: str, fraction: float, offset: tuple[int, int]) -> np.ndarray:
  """The shape at `fraction` of 128 px, area-downsampled 2x, cropped to its box, flattened."""
  mask = locca_shapes._shape_mask(kind, round(fraction * 128 * 4) / 4).astype(np.float32)
  canvas = np.zeros((CANVAS, CANVAS), np.float32)
  oy, ox = offset
  canvas[oy:oy + mask.shape[0], ox:ox + mask.shape[1]] = mask
  half = canvas.reshape(CANVAS // 2, 2, CANVAS // 2, 2).mean((1, 3))
  ys, xs = np.nonzero(half > 0)
  out = np.zeros((CROP, CROP), np.float32)
  box = half[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  out[:box.shape[0], :box.shape[1]] = box
  return out.ravel()


def main():
  rng = np.random.default_rng(0)
  for size in locca_shapes.SIZES:
    lo, hi = locca_shapes._SIZE_RANGE[size]
    x, y = [], []
    for k, kind in enumerate(locca_shapes.SHAPES):
      for _ in range(PER_SHAPE):
        offset = tuple(int(v) for v in rng.integers(2, 4, size=2))
        x.append(render_64px(kind, rng.uniform(lo, hi), offset))
        y.append(k)
    x, y = np.stack(x), np.array(y)
    dist = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    accuracy = np.mean(y[dist.argmin(1)] == y)
    print(f"{size}: leave-one-out 1-NN shape accuracy at 64 px {accuracy:.3f} "
          f"({len(y)} renderings)")


if __name__ == "__main__":
  main()
