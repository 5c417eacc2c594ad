"""ViT input contract (uint8 pixels mapped to [-1, 1] inside the model) and its conv stem."""
import jax
import ml_collections
import numpy as np
import pytest

from locca_jax.models import locca
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


def test_conv_stem_is_translation_equivariant_in_steps_of_the_patch_size():
  # A pattern on a zero image (zero = the convolutions' SAME padding), moved by one patch
  # (8 px = three stride-2 convolutions), moves the token grid by exactly one token.
  stem = vit.ConvStem(width=32, patch_size=8)
  pattern = np.random.default_rng(0).uniform(-1, 1, (12, 12, 3)).astype(np.float32)
  image = np.zeros((1, 48, 48, 3), np.float32)
  image[0, 16:28, 8:20] = pattern
  moved = np.zeros_like(image)
  moved[0, 16:28, 16:28] = pattern
  params = stem.init(jax.random.PRNGKey(0), image)
  grid, grid_moved = stem.apply(params, image), stem.apply(params, moved)
  assert grid.shape == (1, 6, 6, 32)
  np.testing.assert_allclose(grid_moved[:, :, 1:], grid[:, :, :-1], atol=1e-5)
  # Not trivially so: the pattern's tokens differ from the empty ones.
  assert np.abs(grid[0, 2:4, 1:3] - grid[0, 0, 5]).max() > 1e-2


def test_conv_stem_rejects_a_patch_size_that_is_not_a_power_of_two():
  model = vit.ViT(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=6, stem="conv")
  with pytest.raises(ValueError, match="power-of-two patch size"):
    model.init(jax.random.PRNGKey(0), np.zeros((1, 12, 12, 3), np.float32))


def test_config_stem_conv_builds_the_conv_stem_into_the_locca_encoder():
  model_config = ml_collections.ConfigDict(dict(
      encoder=dict(variant="mu/8", width=32, depth=1, mlp_dim=64, num_heads=2,
                   posemb="sincos2d", stem="conv"),
      decoder=dict(num_layers=1, width=None, mlp_dim=None, num_heads=None),
      dtype="float32", attention="xla"))
  model = locca.make_model(model_config, vocab_size=16, max_len=4)
  image = np.zeros((1, 16, 16, 3), np.uint8)
  params = model.init(jax.random.PRNGKey(0), image, np.zeros((1, 1, 4), np.int32),
                      np.ones((1, 1, 4, 4), bool))["params"]
  assert set(params["img"]) >= {"stem"} and "embedding" not in params["img"]
  # 3 stages for patch 8: channels 8, 16, 32 (the encoder's width).
  assert params["img"]["stem"]["conv2_2"]["kernel"].value.shape == (3, 3, 32, 32)
