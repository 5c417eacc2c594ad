r"""Shows training examples as the model gets them: images with their task targets drawn.

  python -m locca_jax.data.inspect --config=configs/locca_b16.py:runlocal --num=16 --out=grid.png

Takes the first `num` examples of the training stream (process 0 of 1; the config's data,
crop, resize and tasks; `--config.input.shuffle_buffer=0` for file order, which also starts
faster with a big buffer) and writes a grid of tiles, `cols` per row. A tile is the model-input
image scaled to `cell` x `cell` pixels (nearest neighbour), with the boxes of its ARef
(red) and GCap (green) rows drawn on it, over a white text panel `text_height` pixels high
holding the record name and the decoded task rows (each cut to two lines). The boxes are parsed
back from the token rows with the tokenizer's box codec (`Tokenizer.parse_box`, bin centres),
so the picture shows what the model is trained on, after crop, resize and quantization.

Layout (for checks and other tools):
  grid size: width = cols * cell, height = ceil(num / cols) * (cell + text_height);
  text_height default: LINE_HEIGHT * (1 + 2 * number of tasks) + 4;
  a box [ymin, xmin, ymax, xmax] (normalized to the model input) is a rectangle outline
  `BOX_WIDTH` px wide drawn inward from the pixels `box_pixels(box, cell)` of its tile;
  GCap is drawn after ARef.
Prints one JSON line: {"out", "size", "examples": [{"record", "rows", "boxes"}, ...]}.
"""
import copy
import json
import math

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from locca_jax.data import input_pipeline
from locca_jax.data import tasks as tasks_lib

BOX_COLORS = {"aref": (255, 0, 0), "gcap": (0, 200, 0)}
TEXT_COLORS = {"cap": (0, 0, 0), "aref": (200, 0, 0), "gcap": (0, 140, 0)}
BOX_WIDTH = 2
LINE_HEIGHT = 12



def default_text_height(num_tasks):
  return LINE_HEIGHT * (1 + 2 * num_tasks) + 4


def box_pixels(box, cell):
  """Normalized [ymin, xmin, ymax, xmax] -> inclusive pixel corners (x0, y0, x1, y1) in a
  `cell`-sized tile: left/top = floor(v * cell), right/bottom = ceil(v * cell) - 1, clipped."""
  ymin, xmin, ymax, xmax = (float(v) for v in box)
  x0 = min(max(math.floor(xmin * cell), 0), cell - 1)
  y0 = min(max(math.floor(ymin * cell), 0), cell - 1)
  x1 = min(max(math.ceil(xmax * cell) - 1, x0), cell - 1)
  y1 = min(max(math.ceil(ymax * cell) - 1, y0), cell - 1)
  return x0, y0, x1, y1


def task_box(row_text, task, prefix, tokenizer):
  """The box a decoded task row carries (np [4] yxyx), or None (cap rows, empty or cut rows).

  aref rows are "aref: <text> : <box>", gcap rows "gcap: <box> : <text>" (tasks.py).
  """
  if task not in BOX_COLORS or not row_text.startswith(prefix):
    return None
  body = row_text[len(prefix):]
  if task == "aref":
    if tasks_lib.SEPARATOR not in body:
      return None
    body = body.rsplit(tasks_lib.SEPARATOR, 1)[1]
  return tokenizer.parse_box(body)


def first_examples(config, num, tokenizer):
  """The first `num` training examples (one batch of `num`; process 0 of 1) as numpy."""
  config = copy.deepcopy(config)
  config.input.batch_size = int(num)
  ds = input_pipeline.make_train_dataset(config, tokenizer, process_index=0, process_count=1,
                                         extra_fields=("record",))
  return next(ds.as_numpy_iterator())


def describe(batch, config, tokenizer):
  """[{record, rows: [(task, text)], boxes: {task: [ymin, xmin, ymax, xmax]}}] per example."""
  tasks = tuple(config.input.tasks)
  prefixes = dict(tasks_lib.DEFAULT_PREFIXES)
  prefixes.update(dict(config.input.get("prefixes", None) or {}))
  out = []
  for i in range(batch["text"].shape[0]):
    rows, boxes = [], {}
    for t, task in enumerate(tasks):
      text = tokenizer.decode(batch["text"][i, t])
      rows.append((task, text))
      box = task_box(text, task, prefixes[task], tokenizer)
      if box is not None:
        boxes[task] = [float(v) for v in box]
    out.append(dict(record=batch["record"][i].decode("utf-8", "replace"), rows=rows,
                    boxes=boxes))
  return out


def _wrap(text, font, width):
  """Greedy word wrap to lines at most `width` pixels long (long words are cut)."""
  lines, line = [], ""
  for word in text.split():
    candidate = f"{line} {word}" if line else word
    if font.getlength(candidate) <= width:
      line = candidate
      continue
    if line:
      lines.append(line)
    while font.getlength(word) > width and len(word) > 1:
      cut = len(word) - 1
      while cut > 1 and font.getlength(word[:cut]) > width:
        cut -= 1
      lines.append(word[:cut])
      word = word[cut:]
    line = word
  return lines + [line] if line or not lines else lines


def render_grid(images, examples, *, cols, cell, text_height):
  """images [n, S, S, 3] (uint8 pixels, or float in [-1, 1]) + `describe` output -> PIL RGB grid
  image."""
  n = len(examples)
  rows = -(-n // cols)
  tile_h = cell + text_height
  grid = Image.new("RGB", (cols * cell, rows * tile_h), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  font = ImageFont.load_default()
  width = cell - 4
  for i, ex in enumerate(examples):
    ox, oy = (i % cols) * cell, (i // cols) * tile_h
    pixels = images[i]
    if pixels.dtype != np.uint8:
      pixels = np.clip(np.round((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)
    grid.paste(Image.fromarray(pixels).resize((cell, cell), Image.NEAREST), (ox, oy))
    for task in ("aref", "gcap"):
      if task in ex["boxes"]:
        x0, y0, x1, y1 = box_pixels(ex["boxes"][task], cell)
        draw.rectangle([ox + x0, oy + y0, ox + x1, oy + y1], outline=BOX_COLORS[task],
                       width=BOX_WIDTH)
    lines = [(_wrap(ex["record"], font, width)[0], (90, 90, 90))]
    for task, text in ex["rows"]:
      wrapped = _wrap(text or f"({task}: empty row)", font, width)[:2]
      lines += [(line, TEXT_COLORS.get(task, (0, 0, 0))) for line in wrapped]
    y = oy + cell + 2
    for line, color in lines:
      if y + LINE_HEIGHT > oy + tile_h:
        break
      draw.text((ox + 2, y), line, fill=color, font=font)
      y += LINE_HEIGHT
  return grid


def run(config, num, out, *, cols=0, cell=256, text_height=0):
  """Renders the first `num` training examples of `config` to the PNG `out`.

  Returns dict(out, size=[width, height], examples=`describe` output).
  """
  if num < 1:
    raise ValueError(f"--num={num} (expected a positive number of examples)")
  if cell < 8:
    raise ValueError(f"--cell={cell} (expected a tile size of at least 8 pixels)")
  cols = cols or int(math.ceil(math.sqrt(num)))
  text_height = text_height or default_text_height(len(config.input.tasks))
  tokenizer = input_pipeline.make_tokenizer(config.input.tokenizer)
  batch = first_examples(config, num, tokenizer)
  examples = describe(batch, config, tokenizer)
  grid = render_grid(batch["image"], examples, cols=cols, cell=cell, text_height=text_height)
  from etils import epath  # pylint: disable=g-import-not-at-top
  with epath.Path(out).open("wb") as f:   # local or gs://
    grid.save(f, format="PNG")
  return dict(out=str(out), size=list(grid.size), examples=examples)


def _define_flags():
  """The command's flags, defined only when run as a program (importing defines none)."""
  return dict(
      config=config_flags.DEFINE_config_file("config", None, "Training config file."),
      num=flags.DEFINE_integer("num", 16, "Number of training examples to show."),
      out=flags.DEFINE_string("out", "grid.png", "Output PNG path."),
      cols=flags.DEFINE_integer("cols", 0, "Tiles per grid row (0: ceil(sqrt(num)))."),
      cell=flags.DEFINE_integer("cell", 256, "Tile image size in pixels."),
      text_height=flags.DEFINE_integer("text_height", 0,
                                       "Text panel height (0: from the tasks)."))


def main(argv, flag_values):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  v = {k: f.value for k, f in flag_values.items()}
  result = run(v["config"], v["num"], v["out"], cols=v["cols"], cell=v["cell"],
               text_height=v["text_height"])
  print(json.dumps(result))


if __name__ == "__main__":
  _FLAGS = _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: main(argv, _FLAGS))
