"""`python -m locca_jax.data.inspect`: the grid has the documented size, and each drawn box sits
where the batch's task row says (box parsed from the tokens, mapped to the tile by hand)."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from locca_jax.data import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RED, GREEN = (255, 0, 0), (0, 200, 0)

CONFIG = '''
import ml_collections

def get_config(arg=None):
  return ml_collections.ConfigDict(dict(
      seed=1,
      input=dict(
          data=dict(source="jsonl", path={path!r}), batch_size=4, image_size=32,
          resize="squash", seq_len=48, tasks=("cap", "aref", "gcap"), shuffle_buffer=0,
          crop=dict(kind="inception", area=(0.5, 1.0), aspect=(0.75, 4 / 3), min_visible=0.5),
          tokenizer=dict(sp_model="locca_jax/assets/locca_shapes_sp.model", box_codec="text",
                         bins=500, box_order="xmin ymin xmax ymax"))))
'''


def _dataset(d):
  image = np.full([64, 80, 3], 235, np.uint8)
  image[8:40, 6:30] = (40, 80, 215)
  image[30:60, 44:76] = (235, 205, 30)
  Image.fromarray(image).save(d / "shapes.png")
  regions = [{"box": [6, 8, 30, 40], "text": "the blue square"},
             {"box": [44, 30, 76, 60], "text": "the yellow square"}]
  with open(d / "train.jsonl", "w") as f:
    for i in range(7):
      f.write(json.dumps({"image": "shapes.png", "caption": "two squares", "image_id": i,
                          "regions": regions}) + "\n")
  (d / "config.py").write_text(CONFIG.format(path=str(d / "train.jsonl")))
  spec = importlib.util.spec_from_file_location("inspect_test_config", d / "config.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _on_outline(px, py, corners, width=2):
  x0, y0, x1, y1 = corners
  inside = x0 <= px <= x1 and y0 <= py <= y1
  inner = x0 + width <= px <= x1 - width and y0 + width <= py <= y1 - width
  return inside and not inner


def test_inspect_cli_draws_the_task_boxes_of_the_training_batch(tmp_path):
  config = _dataset(tmp_path)
  num, cols, cell = 5, 3, 96
  out = tmp_path / "grid.png"
  proc = subprocess.run(
      [sys.executable, "-m", "locca_jax.data.inspect", f"--config={tmp_path / 'config.py'}",
       f"--num={num}", f"--cols={cols}", f"--cell={cell}", f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  grid = np.asarray(Image.open(out).convert("RGB"))
  # 2 rows of 3 tiles; text panel of 12 px per line for the record + 2 lines x 3 tasks, + 4.
  text_height = 12 * (1 + 2 * 3) + 4
  assert grid.shape == (2 * (cell + text_height), cols * cell, 3)
  assert printed["size"] == [cols * cell, 2 * (cell + text_height)]

  # The same batch from the pipeline (deterministic): parse each row's box from its tokens.
  tok = input_pipeline.make_tokenizer(config.input.tokenizer)
  config.input.batch_size = num
  batch = next(input_pipeline.make_train_dataset(config, tok, process_index=0,
                                                 process_count=1).as_numpy_iterator())
  checked = 0
  for i in range(num):
    aref = tok.decode(batch["text"][i, 1])   # "aref: <text> : <box>"
    gcap = tok.decode(batch["text"][i, 2])   # "gcap: <box> : <text>"
    boxes = {"aref": tok.parse_box(aref.split(" : ")[1]),
             "gcap": tok.parse_box(gcap[len("gcap:"):].split(" : ")[0])}
    assert printed["examples"][i]["rows"][1][1] == aref
    ox, oy = (i % cols) * cell, (i // cols) * (cell + text_height)
    corners = {}
    for task, (ymin, xmin, ymax, xmax) in boxes.items():
      corners[task] = (math.floor(xmin * cell), math.floor(ymin * cell),
                       math.ceil(xmax * cell) - 1, math.ceil(ymax * cell) - 1)
      np.testing.assert_allclose(printed["examples"][i]["boxes"][task],
                                 [ymin, xmin, ymax, xmax])
    for task, color in (("aref", RED), ("gcap", GREEN)):
      x0, y0, x1, y1 = corners[task]
      for px, py in ((x0, (y0 + y1) // 2), (x1, (y0 + y1) // 2), ((x0 + x1) // 2, y0),
                     ((x0 + x1) // 2, y1)):
        # GCap is drawn over ARef where the two outlines cross.
        want = GREEN if task == "aref" and _on_outline(px, py, corners["gcap"]) else color
        assert tuple(grid[oy + py, ox + px]) == want, (i, task, px, py)
        checked += 1
    # Inside the box, away from the outlines, the image shows through (no box colour).
    x0, y0, x1, y1 = corners["aref"]
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if not _on_outline(cx, cy, corners["gcap"]):
      assert tuple(grid[oy + cy, ox + cx]) not in (RED, GREEN)
  assert checked == num * 8
