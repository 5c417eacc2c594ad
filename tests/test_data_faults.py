"""Fault injection: training on a JSONL dataset in which ~5% of the records are bad in each way
the pipeline must survive finishes without NaN, reports exactly the injected counts by reason in
metrics.jsonl, and reads every good record (one epoch = exactly the good records, once each).
"""
import io
import json

import numpy as np
import pytest
from PIL import Image

from locca_jax import train
from locca_jax.data import input_pipeline
from tests.conftest import tiny_config

H, W = 40, 48
GOOD_REGION = {"box": [4, 4, 20, 20], "text": "red circle"}
LONG = "long " * 120   # 600 characters > max_text_len 512
PER_KIND = 5           # of 100 records: 5% per kind
# kind -> (record given its image_id, counter it must raise, whether the record stays usable)
# Region / caption faults drop only the bad part; the record keeps its good region.
KINDS = {
    "unreadable_image": (lambda i: {"image": "garbage.jpg", "caption": "x", "image_id": i},
                         "parse/unreadable_image", False),
    "truncated_image": (lambda i: {"image": "truncated.jpg", "caption": "x", "image_id": i},
                        "stream/unreadable_image", False),
    "missing_file": (lambda i: {"image": f"missing_{i}.jpg", "caption": "x", "image_id": i},
                     "parse/missing_file", False),
    "malformed_json": (lambda i: '{"image": "good.jpg", "caption": "a red', "parse/malformed_json",
                       False),
    "box_out_of_range": (lambda i: _record(i, {"box": [0, 0, 2 * W, 20], "text": "far"}),
                         "stream/box_out_of_range", True),
    "box_zero_area": (lambda i: _record(i, {"box": [10, 10, 10, 30], "text": "flat"}),
                      "stream/box_empty", True),
    "box_max_below_min": (lambda i: _record(i, {"box": [30, 10, 5, 20], "text": "inverted"}),
                          "parse/bad_box", True),
    "empty_text": (lambda i: _record(i, {"box": [0, 0, 10, 10], "text": "   "}),
                   "stream/empty_text", True),
    "long_text": (lambda i: _record(i, {"box": [0, 0, 10, 10], "text": LONG}),
                  "stream/long_text", True),
    "empty_caption": (lambda i: _record(i, caption=" "), "stream/empty_caption", True),
    "long_caption": (lambda i: _record(i, caption=LONG), "stream/long_caption", True),
}


def _record(image_id, bad_region=None, caption="a red circle"):
  regions = [GOOD_REGION] + ([bad_region] if bad_region else [])
  return {"image": "good.jpg", "caption": caption, "image_id": image_id, "regions": regions}


def _write_dataset(d):
  """100 JSONL lines (5 of each bad kind, the rest good) in random order, a good one last.
  Returns (path, image ids of the usable records in file order, expected counters)."""
  image = np.full([H, W, 3], 240, np.uint8)
  image[4:20, 4:20] = (220, 30, 30)
  Image.fromarray(image).save(d / "good.jpg", format="JPEG")
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG")
  # Cut inside the compressed data: the header (and so the size) still reads, the end does not.
  jpeg = buf.getvalue()
  scan = jpeg.index(b"\xff\xda")
  (d / "truncated.jpg").write_bytes(jpeg[: scan + (len(jpeg) - scan) // 2])
  (d / "garbage.jpg").write_bytes(b"this is not an image file at all")
  kinds = [k for k in KINDS for _ in range(PER_KIND)]
  kinds += ["good"] * (100 - len(kinds))
  order = np.random.default_rng(0).permutation(len(kinds) - 1)
  kinds = [kinds[i] for i in order] + ["good"]
  usable, lines = [], []
  for image_id, kind in enumerate(kinds):
    make, _, keep = KINDS.get(kind, (_record, None, True))
    line = make(image_id)
    lines.append(line if isinstance(line, str) else json.dumps(line))
    if keep:
      usable.append(image_id)
  path = d / "train.jsonl"
  path.write_text("\n".join(lines) + "\n")
  expected = {f"data/train/{counter}": PER_KIND for _, counter, _ in KINDS.values()}
  return str(path), usable, expected


@pytest.mark.slow
def test_training_survives_bad_records_counts_each_and_reads_every_good_one(tmp_path):
  path, usable, expected = _write_dataset(tmp_path)
  assert len(usable) == 80
  config = tiny_config(str(tmp_path / "tfds"))
  config.input.data = dict(source="jsonl", path=path)
  config.input.shuffle_buffer = 0        # file order: one epoch = the first 80 / 8 batches
  config.total_steps = len(usable) // config.input.batch_size
  config.log_every, config.ckpt_every = 5, 100

  state = train.train_and_evaluate(config, str(tmp_path / "workdir"))
  assert int(state["step"]) == 10
  with open(tmp_path / "workdir" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [5, 10]
  assert all(np.isfinite(r["train/loss"]) for r in records)
  # After exactly one epoch, every counter equals what was injected (nothing else is counted).
  assert {k: v for k, v in records[-1].items() if k.startswith("data/")} == expected

  # The same pipeline yields each usable record once per epoch, in file order, then repeats;
  # no ARef / GCap target is a dropped region.
  tok = input_pipeline.make_tokenizer(config.input.tokenizer)
  ds = input_pipeline.make_train_dataset(config, tok, process_index=0, process_count=1,
                                         extra_fields=("image/id",))
  batches = list(ds.take(11).as_numpy_iterator())
  ids = np.concatenate([b["image/id"] for b in batches])
  assert ids[:80].tolist() == usable
  assert ids[80:].tolist() == usable[:8]
  rows = [[tok.decode(r) for r in ex] for b in batches[:10] for ex in b["text"]]
  assert all(r[1].startswith("aref: red circle : ") for r in rows)
  assert all(r[2].startswith("gcap: ") and r[2].endswith(" : red circle") for r in rows)
