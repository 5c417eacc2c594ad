"""Predictor and `python -m locca_jax.predict`: pixel boxes of the original image through the
eval preprocessing (squash / letterbox) and back, the CLI drawing, clear errors for bad files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from locca_jax import predict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 427, 640  # the test photo: landscape, not square
RED = np.array([255, 0, 0])


def _photo(path, height=H, width=W):
  """A JPEG with no saturated red in it (R <= 150): smooth gradients and a dark disc."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  y, x = np.mgrid[:height, :width]
  img = np.stack([x * 150 // width, y * 200 // height, np.full_like(x, 120)], -1)
  img[(y - height // 2) ** 2 + (x - width // 3) ** 2 < (height // 5) ** 2] = (20, 30, 40)
  Image.fromarray(img.astype(np.uint8)).save(path, quality=90)
  return path


# ------------------------------------------------------------------------------ pixel mapping
@pytest.mark.parametrize("height,width", [(H, W), (500, 300)])
def test_pixel_box_to_model_input_and_back_matches_the_hand_computation(height, width):
  size, box = 32, np.array([100.0, 50.0, 290.0, 200.0])  # xmin ymin xmax ymax pixels
  x0, y0, x1, y1 = box
  # squash: the normalized box of the original image is the model input's.
  fr = predict.frame(height, width, size, "squash")
  np.testing.assert_allclose(fr.to_model(box), [y0 / height, x0 / width, y1 / height,
                                                x1 / width], rtol=1e-6)
  np.testing.assert_allclose(fr.to_pixels(fr.to_model(box)), box, rtol=1e-5)
  # letterbox: the longer side -> 32 px, the other round(side * 32 / longer), centred.
  scale = size / max(height, width)
  new_h, new_w = round(height * scale), round(width * scale)
  off_y, off_x = (size - new_h) // 2, (size - new_w) // 2
  expected = np.array([y0 * new_h / height + off_y, x0 * new_w / width + off_x,
                       y1 * new_h / height + off_y, x1 * new_w / width + off_x]) / size
  fr = predict.frame(height, width, size, "letterbox")
  np.testing.assert_allclose(fr.to_model(box), expected, rtol=1e-6)
  np.testing.assert_allclose(fr.to_pixels(expected), box, rtol=1e-5)
  # The whole model input (padding included) is the whole original image, no more.
  np.testing.assert_allclose(fr.to_pixels([0, 0, 1, 1]), [0, 0, width, height], atol=1e-9)


def test_preprocess_image_maps_a_box_as_the_frame_does_and_pads_letterbox_with_zeros():
  image = np.full((H, W, 3), 200, np.uint8)
  box = [100.0, 50.0, 300.0, 200.0]
  out, fr, model_box = predict.preprocess_image(image, 32, "letterbox", box)
  np.testing.assert_allclose(model_box, fr.to_model(box), rtol=1e-6)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  # 427 x 640 -> 21 x 32 rows, padded 5 above and 6 below with pixel value 0 (-1 in the model).
  np.testing.assert_array_equal(out[:5], 0)
  np.testing.assert_array_equal(out[-6:], 0)
  np.testing.assert_array_equal(out[5:-6], 200)
  with pytest.raises(ValueError, match=r"no area inside the 640x427 image"):
    predict.preprocess_image(image, 32, "letterbox", [700, 10, 800, 20])


# ------------------------------------------------------------------------------ bad files
def test_missing_or_unreadable_image_errors_name_the_file(tmp_path):
  missing = tmp_path / "nope.jpg"
  with pytest.raises(FileNotFoundError, match=r"nope\.jpg: no such file"):
    predict.load_image(missing)
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"this is not a jpeg")
  with pytest.raises(ValueError, match=r"broken\.jpg: cannot be read as an image"):
    predict.load_image(str(broken))
  with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\].*float32"):
    predict.load_image(np.zeros((4, 4, 3), np.float32))


# ------------------------------------------------------------------------------ end to end
def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def trained(shapes_data_dir, tmp_path_factory):
  """A letterbox tiny_config workdir trained 6 steps (config in WORKDIR/config.json), a
  640x427 JPEG, and the CLI's `locate` on it, started here to run beside the other tests."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from locca_jax import train  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("predict")
  config = tiny_config(shapes_data_dir)
  config.input.resize = "letterbox"
  workdir = root / "workdir"
  train.train_and_evaluate(config, str(workdir))
  (workdir / "config.json").write_text(config.to_json())
  photo = _photo(str(root / "photo.jpg"))
  out = root / "out.png"
  cli = subprocess.Popen(
      [sys.executable, "-m", "locca_jax.predict", f"--workdir={workdir}", f"--image={photo}",
       "--task=locate", "--text=the red circle", f"--out={out}"],
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  yield dict(config=config, workdir=workdir, photo=photo, out=out, cli=cli)
  if cli.poll() is None:
    cli.kill()


@pytest.fixture(scope="module")
def predictor(trained):
  return predict.Predictor.from_workdir(str(trained["workdir"]))


def _inside(box, height=H, width=W):
  x0, y0, x1, y1 = box
  return 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


@pytest.mark.slow
def test_locate_returns_the_decoded_box_in_original_pixels_inside_the_image(trained, predictor):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  result = predictor.locate(trained["photo"], "the blue square")
  assert _inside(result["box"]), result
  assert result["query"] == "the blue square" and not result["truncated"]
  # By hand from the decoded text "xmin ymin xmax ymax" (500 bins, bin centres) and the
  # letterbox of 427x640 into 32 px: 21 rows from row 5, all 32 columns.
  q = np.array([int(v) for v in result["text"].split()])
  xn, yn = (q[[0, 2]] + 0.5) / 500, (q[[1, 3]] + 0.5) / 500
  xs = np.clip(xn * W, 0, W)
  ys = np.clip((yn * 32 - 5) / 21 * H, 0, H)
  np.testing.assert_allclose(result["box"], [xs[0], ys[0], xs[1], ys[1]], rtol=1e-5, atol=1e-3)
  # A path, a PIL image and an array of the same pixels give the same answer.
  pixels = predict.load_image(trained["photo"])
  assert predictor.locate(pixels, "the blue square") == result
  assert predictor.locate(Image.open(trained["photo"]), "the blue square") == result


@pytest.mark.slow
def test_caption_and_describe_return_text(trained, predictor):
  assert isinstance(predictor.caption(trained["photo"]), str)
  assert isinstance(predictor.describe(trained["photo"], [100, 50, 300, 200]), str)
  with pytest.raises(ValueError, match=r"no area inside"):
    predictor.describe(trained["photo"], [650, 10, 700, 20])


@pytest.mark.slow
def test_cli_locate_prints_json_and_draws_the_box_where_the_json_says(trained):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  stdout, stderr = trained["cli"].communicate(timeout=300)
  assert trained["cli"].returncode == 0, stderr[-4000:]
  lines = stdout.strip().splitlines()
  assert len(lines) == 1, stdout
  result = json.loads(lines[0])
  assert result["task"] == "locate" and result["step"] == 6
  assert _inside(result["box"]), result
  drawn = np.asarray(Image.open(trained["out"]).convert("RGB")).astype(int)
  assert drawn.shape == (H, W, 3)
  red = np.all(drawn == RED, axis=-1)
  x0, y0, x1, y1 = (int(round(v)) for v in result["box"])
  x1, y1 = min(x1, W - 1), min(y1, H - 1)
  xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
  # Each edge is red at its middle (within a couple of pixels across the line) ...
  assert red[ym, max(x0 - 2, 0):x0 + 3].any() and red[ym, max(x1 - 2, 0):x1 + 3].any()
  assert red[max(y0 - 2, 0):y0 + 3, xm].any() and red[max(y1 - 2, 0):y1 + 3, xm].any()
  # ... and every red pixel lies on the outline: within 6 px of an edge, inside the box.
  yy, xx = np.nonzero(red)
  near_x = (np.minimum(np.abs(xx - x0), np.abs(xx - x1)) <= 6) & (yy >= y0 - 6) & (yy <= y1 + 6)
  near_y = (np.minimum(np.abs(yy - y0), np.abs(yy - y1)) <= 6) & (xx >= x0 - 6) & (xx <= x1 + 6)
  assert red.sum() > 0 and np.all(near_x | near_y)
  # The source photo has no such red anywhere.
  source = np.asarray(Image.open(trained["photo"]).convert("RGB")).astype(int)
  assert not np.all(source == RED, axis=-1).any()


@pytest.mark.slow
def test_cli_names_an_unreadable_image_file(tmp_path):
  broken = tmp_path / "holiday.jpg"
  broken.write_bytes(b"\x00" * 64)
  proc = subprocess.run(
      [sys.executable, "-m", "locca_jax.predict", f"--workdir={tmp_path}",
       f"--image={broken}", "--task=caption"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert f"{broken}: cannot be read as an image" in proc.stderr
  assert proc.stdout == ""
