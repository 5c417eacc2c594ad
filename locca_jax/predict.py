r"""Caption / locate / describe on real image files, from a trained workdir.

  p = Predictor.from_workdir("workdirs/locca")         # config: WORKDIR/config.json
  p.caption("photo.jpg")                                # -> "a red circle and a blue star"
  p.locate("photo.jpg", "the red circle")               # -> {"box": [x0, y0, x1, y1], ...}
  p.describe("photo.jpg", [12, 40, 200, 310])           # -> "the red circle"

  python -m locca_jax.predict --workdir=W [--config=configs/x.py:arg] --image=photo.jpg \
      --task=locate --text="the red circle" --out=out.png

The CLI prints one JSON object on stdout and, with --out, draws the box and text on the image.

An image is a path, a PIL image or a uint8 [H, W, 3] array of any size and aspect. It goes
through the evaluators' preprocessing (`preprocess.preprocess_example`: config.input.resize
"squash" or "letterbox", uint8 pixels). Boxes given and returned are `[xmin, ymin,
xmax, ymax]` in pixels of the ORIGINAL image; the mapping to and from the model input (the
letterbox padding undone) is a `Frame`, measured by pushing the unit box through the same
preprocessing, and the pixel conversions are those of `locca_jax.boxes`.

Prompts are the evaluators' (`rec.prompt_ids`, `gcap.prompt_ids`, the `cap:` prefix), greedy
decoding, and `locate` decodes under the box constraint (`decode.BoxConstraint`) so that it
always returns a box. Decoded lengths: the max_len of the config's evaluator of that type
(config.evals.*.type == "caption" / "rec" / "gcap") if there is one, else the evaluators'
defaults. Runs on one device (the first of `jax.devices()`).

The config: `config=` a ConfigDict, or a path (`file.py` / `file.py:arg` with `get_config`,
or a `.json` written by `ConfigDict.to_json()`); by default WORKDIR/config.json.
"""
import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from locca_jax import boxes as boxlib
from locca_jax import decode as decode_lib
from locca_jax import evaluate
from locca_jax import sharding
from locca_jax.data import input_pipeline
from locca_jax.data import preprocess
from locca_jax.evaluators import caption as caption_eval
from locca_jax.evaluators import common
from locca_jax.evaluators import gcap
from locca_jax.evaluators import rec
from locca_jax.models import locca

TASKS = ("caption", "locate", "describe")
CONFIG_FILE = "config.json"  # WORKDIR/config.json: the default config (ConfigDict.to_json())
BOX_COLOR = (255, 0, 0)


# ------------------------------------------------------------------------------ config
def load_config(path: str) -> ml_collections.ConfigDict:
  """A config from `file.json` (ConfigDict.to_json()) or `file.py[:arg]` (get_config(arg))."""
  file, arg = path, None
  if not path.endswith(".json") and ":" in os.path.basename(path):
    file, arg = path.rsplit(":", 1)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"config {file}: no such file (expected a .py with get_config or "
                            f"a .json written by ConfigDict.to_json())")
  if file.endswith(".json"):
    with open(file) as f:
      try:
        return ml_collections.ConfigDict(json.load(f))
      except json.JSONDecodeError as e:
        raise ValueError(f"config {file}: not valid JSON ({e})") from None
  spec = importlib.util.spec_from_file_location("_locca_predict_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config {file}: defines no get_config(arg=None)")
  return module.get_config(arg) if arg is not None else module.get_config()


def workdir_config(workdir: str, config=None) -> ml_collections.ConfigDict:
  """`config` (a ConfigDict, or a path for `load_config`), else WORKDIR/config.json."""
  if isinstance(config, ml_collections.ConfigDict):
    return config
  if config:
    return load_config(config)
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--workdir={workdir}: no {CONFIG_FILE}; pass the training config "
                            "(config= / --config=configs/....py[:arg])")
  return load_config(path)


# ------------------------------------------------------------------------------ images
def load_image(image) -> np.ndarray:
  """A path, PIL image or uint8 [H, W, 3] array -> uint8 [H, W, 3] (EXIF rotation applied)."""
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"image {path}: no such file")
    try:
      with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise ValueError(f"image {path}: cannot be read as an image ({e})") from None
  if isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"))
  arr = np.asarray(image)
  if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3 or 0 in arr.shape:
    raise ValueError(f"image: expected a path, a PIL image or a uint8 [H, W, 3] array, got "
                     f"{type(image).__name__} dtype {arr.dtype} shape {arr.shape}")
  return arr


@dataclasses.dataclass(frozen=True)
class Frame:
  """Where an original `height` x `width` image lies in the (square) model input.

  A normalized yxyx box of the original image maps to the model input's as
  `box * scale + offset` (squash: scale 1, offset 0; letterbox: the resized image's share of
  the input and its padding).
  """
  height: int
  width: int
  scale: np.ndarray   # [4] (ys, xs, ys, xs)
  offset: np.ndarray  # [4] (oy, ox, oy, ox)

  @classmethod
  def from_unit_box(cls, height, width, unit_box) -> "Frame":
    """From the model-input box [oy, ox, oy + ys, ox + xs] of the whole image [0, 0, 1, 1]."""
    b = np.asarray(unit_box, np.float64)
    return cls(int(height), int(width), scale=np.tile(b[2:] - b[:2], 2),
               offset=np.tile(b[:2], 2))

  def to_model(self, box_xyxy_pixels) -> np.ndarray:
    """[xmin, ymin, xmax, ymax] original pixels -> normalized yxyx of the model input."""
    b = boxlib.from_xyxy_pixels(box_xyxy_pixels, self.height, self.width)
    return b * self.scale + self.offset

  def to_pixels(self, box_yxyx_model) -> np.ndarray:
    """Normalized yxyx of the model input -> [xmin, ymin, xmax, ymax] original pixels, clipped
    to the image (a box reaching into letterbox padding stops at the image's edge)."""
    b = (np.asarray(box_yxyx_model, np.float64) - self.offset) / self.scale
    return boxlib.to_xyxy_pixels(boxlib.clip(b), self.height, self.width)


def frame(height: int, width: int, image_size: int, resize: str = "squash") -> Frame:
  """The Frame of a `height` x `width` image under `preprocess.resize_image_and_boxes`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _, unit = preprocess.resize_image_and_boxes(tf.zeros([height, width, 1], tf.uint8),
                                              tf.constant([[0.0, 0.0, 1.0, 1.0]]), image_size,
                                              resize)
  return Frame.from_unit_box(height, width, unit.numpy()[0])


def preprocess_image(image: np.ndarray, image_size: int, resize: str = "squash",
                     box_xyxy_pixels=None):
  """uint8 [H, W, 3] (+ a pixel box) through `preprocess.preprocess_example`, as in eval.

  Returns (model image uint8 [S, S, 3], Frame, the box as normalized yxyx of the
  model input (clipped, as in eval) or None). Raises ValueError when the box has no area
  inside the image.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  unit = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)
  bbox, names = unit, ["frame"]
  if box_xyxy_pixels is not None:
    box = boxlib.from_xyxy_pixels(box_xyxy_pixels, h, w)
    bbox, names = np.concatenate([unit, np.asarray(box, np.float32)[None]]), ["frame", "query"]
  out = preprocess.preprocess_example(
      dict(image=tf.constant(image), objects=dict(bbox=tf.constant(bbox),
                                                  refexp=tf.constant(names))),
      image_size, resize)
  kept = {n.decode(): b for n, b in zip(out["refexps"].numpy(), out["boxes"].numpy())}
  query = None
  if box_xyxy_pixels is not None:
    if "query" not in kept:
      raise ValueError(f"box {list(np.asarray(box_xyxy_pixels).tolist())}: no area inside the "
                       f"{w}x{h} image (expected [xmin, ymin, xmax, ymax] in its pixels)")
    query = kept["query"].astype(np.float64)
  return out["image"].numpy(), Frame.from_unit_box(h, w, kept["frame"]), query


# ------------------------------------------------------------------------------ predictor
def _eval_of_type(config, kind):
  """(name, cfg) of the config's first evaluator of type `kind`, else (kind, {})."""
  for name, cfg in (config.get("evals") or {}).items():
    if cfg.get("type") == kind:
      return name, cfg
  return kind, {}


class Predictor:
  """A restored LocCa model with its config's tokenizer, prompts and preprocessing."""

  def __init__(self, config: ml_collections.ConfigDict, model, params, tokenizer, mesh,
               step: int | None = None):
    self.config, self.model, self.params = config, model, params
    self.tokenizer, self.mesh, self.step = tokenizer, mesh, step
    self.image_size = int(config.input.image_size)
    self.resize = config.input.get("resize", "squash")
    seq_len = int(config.input.seq_len)
    self._budget = {}  # task -> (prompt width, max_len)
    for task, kind, default in (("caption", "caption", seq_len - caption_eval.PROMPT_WIDTH),
                                ("locate", "rec", rec.DEFAULT_MAX_LEN),
                                ("describe", "gcap", seq_len // 2)):
      name, cfg = _eval_of_type(config, kind)
      self._budget[task] = common.decode_budget(config, name, cfg, default)
    name, cfg = _eval_of_type(config, "rec")
    self.box_constraint = rec.box_constraint(config, tokenizer, name, cfg)

  @classmethod
  def from_workdir(cls, workdir: str, config=None, step: int | None = None) -> "Predictor":
    """Restores WORKDIR/checkpoints/<step> (default: latest) onto the first device.

    config: a ConfigDict, a path (`.py[:arg]` / `.json`), or None for WORKDIR/config.json.
    """
    config = workdir_config(workdir, config)
    mesh = sharding.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)), jax.devices()[:1])
    tokenizer = input_pipeline.make_tokenizer(config.input.tokenizer)
    model = locca.make_model(config.model, tokenizer.vocab_size, config.input.seq_len)
    step, params = evaluate.restore_params(config, model, mesh, workdir, step)
    return cls(config, model, params, tokenizer, mesh, int(step))

  def _decode(self, image: np.ndarray, prompt: list[int], task: str, box_constraint=None):
    width, max_len = self._budget[task]
    prompts, lens = common.prompt_array([prompt], width, lambda _: f"{task} prompt")
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      out = decode_lib.decode(self.model, self.params, image[None], prompts, lens,
                              max_len=max_len, eos_id=self.tokenizer.eos_id, method="greedy",
                              box_constraint=box_constraint)
    return out[0]

  def caption(self, image) -> str:
    """The image's caption (prompt `cap:`)."""
    model_image, _, _ = preprocess_image(load_image(image), self.image_size, self.resize)
    head = self.tokenizer.encode(common.prefix(self.config, "cap"))
    return self.tokenizer.decode(self._decode(model_image, head, "caption"))

  def locate(self, image, text: str) -> dict[str, Any]:
    """The box of the referring expression `text` (prompt `aref: <text> :`).

    Returns dict(box=[xmin, ymin, xmax, ymax] in original pixels (None only if decoding was
    unconstrained and wrote no box), text=the decoded continuation (the box as written),
    query=`text`, truncated=whether `text` was cut to fit the prompt width).
    """
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"text: expected a non-empty referring expression, got {text!r}")
    pixels = load_image(image)
    model_image, fr, _ = preprocess_image(pixels, self.image_size, self.resize)
    width, _ = self._budget["locate"]
    prompt, truncated = rec.prompt_ids(self.tokenizer, self.config, text, width)
    out = self._decode(model_image, prompt, "locate", self.box_constraint)
    box = self.tokenizer.parse_box(out)
    return dict(box=None if box is None else [float(v) for v in fr.to_pixels(box)],
                text=self.tokenizer.decode(out), query=text, truncated=bool(truncated))

  def describe(self, image, box_xyxy_pixels) -> str:
    """The region caption of `box_xyxy_pixels` ([xmin, ymin, xmax, ymax] original pixels)."""
    model_image, _, box = preprocess_image(load_image(image), self.image_size, self.resize,
                                           box_xyxy_pixels)
    prompt = gcap.prompt_ids(self.tokenizer, self.config, box)
    return self.tokenizer.decode(self._decode(model_image, prompt, "describe"))


# ------------------------------------------------------------------------------ drawing
def draw(image, boxes=(), caption: str | None = None):
  """A PIL copy of `image` with `boxes` [(xyxy pixels, label or None, rgb or None)] outlined
  (default BOX_COLOR, labelled on a white tag above the box) and `caption` at the bottom."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(load_image(image)).copy()
  w, h = img.size
  d = ImageDraw.Draw(img)
  d.font = ImageFont.load_default(size=max(11, round(min(w, h) / 36)))
  lw = max(2, round(min(w, h) / 150))
  for box, label, color in boxes:
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = (min(max(round(v), 0), w - 1) for v in (x0, x1))
    y0, y1 = (min(max(round(v), 0), h - 1) for v in (y0, y1))
    d.rectangle([x0, y0, x1, y1], outline=color or BOX_COLOR, width=lw)
    if label:
      l, t, r, b = d.textbbox((0, 0), label)
      th = b - t + 4
      ty = y0 - th if y0 >= th else y0 + lw
      d.rectangle([x0, ty, x0 + r - l + 4, ty + th - 1], fill=(255, 255, 255))
      d.text((x0 + 2 - l, ty + 2 - t), label, fill=(0, 0, 0))
  if caption:
    l, t, r, b = d.textbbox((0, 0), caption)
    d.rectangle([0, h - (b - t) - 6, min(r - l + 6, w - 1), h - 1], fill=(0, 0, 0))
    d.text((3 - l, h - (b - t) - 3 - t), caption, fill=(255, 255, 255))
  return img


def _parse_box_flag(value: str) -> list[float]:
  try:
    box = [float(v) for v in value.split(",")]
  except ValueError:
    box = []
  if len(box) != 4:
    raise app.UsageError(f"--box={value!r}: expected 4 numbers x1,y1,x2,y2 (pixels)")
  return box


def run(predictor: Predictor, image_path: str, task: str, text=None, box=None,
        out=None) -> dict[str, Any]:
  """One CLI request -> its JSON result (and the drawing into `out`)."""
  if task not in TASKS:
    raise ValueError(f"--task={task!r}: expected one of {TASKS}")
  image = load_image(image_path)
  result = dict(image=image_path, task=task, step=predictor.step)
  if task == "caption":
    result["caption"] = predictor.caption(image)
    drawn = draw(image, caption=result["caption"])
  elif task == "locate":
    if not text:
      raise app.UsageError("--task=locate needs --text=\"<referring expression>\"")
    result.update(predictor.locate(image, text))
    drawn = draw(image, [] if result["box"] is None else [(result["box"], text, None)])
  else:
    if box is None:
      raise app.UsageError("--task=describe needs --box=x1,y1,x2,y2 (pixels)")
    result.update(box=list(box), caption=predictor.describe(image, box))
    drawn = draw(image, [(box, result["caption"], None)])
  if out:
    drawn.save(out)
    result["out"] = out
  return result


def _define_flags():
  return dict(
      workdir=flags.DEFINE_string("workdir", None, "Workdir with checkpoints/ (as for train)."),
      config=flags.DEFINE_string("config", None, "Training config: file.py[:arg] or .json "
                                 f"(default: WORKDIR/{CONFIG_FILE})."),
      step=flags.DEFINE_integer("step", None, "Checkpoint step (default: latest)."),
      image=flags.DEFINE_string("image", None, "Image file (jpeg, png, ...)."),
      task=flags.DEFINE_enum("task", "caption", TASKS, "What to predict."),
      text=flags.DEFINE_string("text", None, "locate: the referring expression."),
      box=flags.DEFINE_string("box", None, "describe: x1,y1,x2,y2 in the image's pixels."),
      out=flags.DEFINE_string("out", None, "Write the image with the prediction drawn here."))


def main(argv, f):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # TensorFlow only preprocesses
  box = _parse_box_flag(f["box"].value) if f["box"].value else None
  with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON object only
    load_image(f["image"].value)  # a bad image fails before the checkpoint is restored
    predictor = Predictor.from_workdir(f["workdir"].value, f["config"].value, f["step"].value)
    result = run(predictor, f["image"].value, f["task"].value, f["text"].value, box,
                 f["out"].value)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  _FLAGS = _define_flags()
  flags.mark_flags_as_required(["workdir", "image"])
  app.run(lambda argv: main(argv, _FLAGS))
