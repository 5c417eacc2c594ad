"""ViT input contract: uint8 pixels are mapped to [-1, 1] inside the model."""
import jax
import numpy as np

from locca_jax.models import vit


def test_uint8_pixels_give_the_same_tokens_as_the_float_image_in_minus_one_one():
  model = vit.ViT(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
  pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  reference_input = (pixels.astype(np.float64) / 127.5 - 1.0).astype(np.float32)
  params = model.init(jax.random.PRNGKey(0), reference_input)
  from_pixels = model.apply(params, pixels)
  from_float = model.apply(params, reference_input)
  assert from_pixels.shape == (2, 4, 32)
  np.testing.assert_allclose(from_pixels, from_float, atol=1e-5)
  # 0 and 255 are the ends of the range: the same tokens as -1 and 1.
  ends = np.array([0, 255], np.uint8)[:, None, None, None] * np.ones((1, 16, 16, 3), np.uint8)
  np.testing.assert_allclose(model.apply(params, ends),
                             model.apply(params, np.array([-1.0, 1.0], np.float32)[:, None,
                                                           None, None] * np.ones((1, 16, 16, 3),
                                                                                 np.float32)),
                             atol=1e-5)
