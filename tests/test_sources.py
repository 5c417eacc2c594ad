"""File sources (JSONL, COCO-JSON, Visual Genome), record checks and their counters.

Every test writes its own small files in the documented layouts; expected boxes come from
pixel arithmetic written out here, not from the code under test.
"""
import io
import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework import op_def_registry

from locca_jax.data import input_pipeline
from locca_jax.data.sources import common
from locca_jax.data.sources import json_sources

BINS = 500
HALF_BIN = 0.5 / BINS + 1e-6


def _config(data, tasks=("cap", "aref", "gcap"), **overrides):
  c = ml_collections.ConfigDict(dict(
      seed=0,
      input=dict(
          data=data, batch_size=4, image_size=16, resize="squash", seq_len=48, tasks=tasks,
          shuffle_buffer=0,
          tokenizer=dict(sp_model="locca_jax/assets/locca_shapes_sp.model", box_codec="text",
                         bins=BINS, box_order="xmin ymin xmax ymax"))))
  for k, v in overrides.items():
    c.input[k] = v
  return c


@pytest.fixture(scope="module")
def tok():
  return input_pipeline.make_tokenizer(_config(None).input.tokenizer)


def _write_image(path, height, width, fmt, value=128):
  arr = np.full((height, width, 3), value, np.uint8)
  arr[: height // 2, : width // 2] = (200, 30, 30)
  Image.fromarray(arr).save(path, format=fmt)


def _jpeg_bytes(height, width):
  buf = io.BytesIO()
  Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


def _write_jsonl(path, lines):
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def _rows(batch, tok):
  return [[tok.decode(r) for r in ex] for ex in batch["text"]]


def _split_row(row, prefix):
  """"aref: text : 1 2 3 4" -> ("text", "1 2 3 4"); "gcap: 1 2 3 4 : text" -> (text, box)."""
  body = row[len(prefix):].strip()
  left, _, right = body.partition(" : ")
  return (left, right) if prefix == "aref:" else (right, left)


# ------------------------------------------------------------------------------ JSONL
# a.png: 80 high, 100 wide; b.jpg: 60 high, 40 wide.
A_H, A_W, B_H, B_W = 80, 100, 60, 40
LONG = "long " * 120   # 600 characters > max_text_len 512


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("jsonl")
  _write_image(d / "a.png", A_H, A_W, "PNG")
  os.makedirs(d / "imgs")
  _write_image(d / "imgs" / "b.jpg", B_H, B_W, "JPEG")
  jpeg = _jpeg_bytes(B_H, B_W)
  (d / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
  lines = [
      # line 1: good; one xyxy and one xywh region.
      {"image": "a.png", "caption": "a red circle", "image_id": 5, "regions": [
          {"box": [10, 20, 30, 60], "text": "red circle", "score": 0.9},
          {"box": [50, 40, 25, 20], "box_format": "xywh", "text": "blue square"}]},
      '{"image": "a.png", "caption": ',                        # 2: malformed JSON
      {"caption": "no image"},                                  # 3: no image field
      {"image": "missing.png", "caption": "x"},                 # 4: missing file
      # line 5: kept for its captions; its region has xmax < xmin.
      {"image": "imgs/b.jpg", "caption": ["a green star", "a star"],
       "regions": [{"box": [30, 10, 5, 20], "text": "green star"}]},
      # line 6: cut-off JPEG (size given, so only the in-graph check sees it).
      {"image": "trunc.jpg", "width": B_W, "height": B_H, "caption": "cut short"},
      # line 7: one usable region among bad ones.
      {"image": "a.png", "regions": [
          {"box": [0, 0, 150, 40], "text": "too wide"},
          {"box": [10, 10, 10, 30], "text": "flat"},
          {"box": [0, 0, 10, 10], "text": "   "},
          {"box": [0, 0, 10, 10], "text": LONG},
          {"box": [0, 0, 20, 20], "text": "faint", "score": 0.1},
          {"box": [0, 0, 50, 40], "text": "yellow diamond", "score": 0.5}]},
      {"image": "a.png", "width": 50, "height": 50, "caption": "wrong size"},  # 8: mismatch
      {"image": "a.png"},                                       # 9: no text at all
      {"image": "imgs/b.jpg", "caption": "a purple cross", "image_id": 7},  # 10: good
  ]
  _write_jsonl(d / "train.jsonl", lines)
  return d


def test_jsonl_pixel_boxes_become_normalized_yxyx_once(jsonl_dir):
  counter = common.BadRecordCounter()
  records = json_sources.parse_jsonl(str(jsonl_dir / "train.jsonl"), counter=counter)
  first = records.names.index(f"{jsonl_dir}/train.jsonl line 1")
  # xyxy [10, 20, 30, 60] px of 100 x 80 -> [20/80, 10/100, 60/80, 30/100];
  # xywh [50, 40, 25, 20] px -> [40/80, 50/100, 60/80, 75/100].
  np.testing.assert_allclose(records.boxes[first],
                             [[0.25, 0.1, 0.75, 0.3], [0.5, 0.5, 0.75, 0.75]], atol=1e-6)
  assert records.texts[first] == ["red circle", "blue square"]
  assert records.scores[first] == [pytest.approx(0.9), 1.0]
  assert records.sizes[first] == (A_H, A_W) and records.image_ids[first] == 5
  assert records.paths[first] == str(jsonl_dir / "a.png")
  fifth = records.names.index(f"{jsonl_dir}/train.jsonl line 5")
  assert records.captions[fifth] == ["a green star", "a star"]
  assert records.boxes[fifth].shape == (0, 4)   # Its only region was bad.
  assert records.paths[fifth] == str(jsonl_dir / "imgs" / "b.jpg")
  assert records.sizes[fifth] == (B_H, B_W)     # Read from the file header.


def test_jsonl_bad_lines_are_counted_by_reason_while_parsing(jsonl_dir):
  counter = common.BadRecordCounter()
  records = json_sources.parse_jsonl(str(jsonl_dir / "train.jsonl"), counter=counter)
  assert dict(counter.counts) == dict(malformed_json=1, bad_record=1, missing_file=1,
                                      bad_box=1, no_text=1)
  assert "line 5 field regions[0].box" in counter.examples["bad_box"]
  assert "xmax < xmin" in counter.examples["bad_box"]
  assert len(records) == 6   # lines 1, 5, 6, 7, 8, 10 (6 and 8 fail in graph)


def test_jsonl_strict_raises_naming_file_line_and_field(jsonl_dir):
  with pytest.raises(ValueError, match=r"train.jsonl line 2: not valid JSON"):
    json_sources.parse_jsonl(str(jsonl_dir / "train.jsonl"),
                             counter=common.BadRecordCounter(strict=True))
  path = jsonl_dir / "strict.jsonl"
  _write_jsonl(path, [{"image": "a.png", "caption": "ok"},
                      {"image": "a.png", "regions": [{"box": [30, 10, 5, 20], "text": "x"}]}])
  with pytest.raises(ValueError, match=r"strict.jsonl line 2 field regions\[0\]\.box: .*"
                     r"\[30(\.0)?, 10(\.0)?, 5(\.0)?, 20(\.0)?\] has xmax < xmin"):
    json_sources.parse_jsonl(str(path), counter=common.BadRecordCounter(strict=True))


def test_jsonl_stream_skips_bad_records_and_regions_and_counts_them(jsonl_dir, tok):
  data = dict(source="jsonl", path=str(jsonl_dir / "train.jsonl"))
  config = _config(data)
  it = input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1,
                                          extra_fields=("record", "image/id"))
  batch = next(it)   # The 4 usable records of the first pass, in file order.
  assert "data/skipped" not in batch
  names = [r.decode().rsplit(" ", 1)[-1] for r in batch["record"]]
  assert names == ["1", "5", "7", "10"]
  assert batch["image/id"].tolist() == [5, -1, -1, 7]
  rows = _rows(batch, tok)
  # Line 7 keeps only its one good region; line 5 has no region: empty aref / gcap rows.
  assert _split_row(rows[2][1], "aref:")[0] == "yellow diamond"
  np.testing.assert_allclose(tok.parse_box(_split_row(rows[2][1], "aref:")[1]),
                             [0.0, 0.0, 0.5, 0.5], atol=HALF_BIN)   # [0, 0, 50, 40] px
  assert rows[1][1] == "" and rows[1][2] == ""
  assert rows[1][0] in ("cap: a green star", "cap: a star")
  # Line 1: whichever region is drawn, its box is the one written for its text.
  expected = {"red circle": [0.25, 0.1, 0.75, 0.3], "blue square": [0.5, 0.5, 0.75, 0.75]}
  text, box = _split_row(rows[0][1], "aref:")
  np.testing.assert_allclose(tok.parse_box(box), expected[text], atol=HALF_BIN)
  text, box = _split_row(rows[0][2], "gcap:")
  np.testing.assert_allclose(tok.parse_box(box), expected[text], atol=HALF_BIN)

  label = "train"
  assert it.data_metrics() == {
      f"data/{label}/parse/malformed_json": 1, f"data/{label}/parse/bad_record": 1,
      f"data/{label}/parse/missing_file": 1, f"data/{label}/parse/bad_box": 1,
      f"data/{label}/parse/no_text": 1,
      f"data/{label}/stream/unreadable_image": 1, f"data/{label}/stream/image_size_mismatch": 1,
      f"data/{label}/stream/box_out_of_range": 1, f"data/{label}/stream/box_empty": 1,
      f"data/{label}/stream/empty_text": 1, f"data/{label}/stream/long_text": 1,
      f"data/{label}/stream/low_score": 1}
  next(it)   # The second pass counts the same records again.
  assert it.data_metrics()[f"data/{label}/stream/unreadable_image"] == 2


def _common_example(boxes, texts, scores=None, captions=(), image=None):
  image = image if image is not None else _jpeg_bytes(8, 8)
  return common.make_common(image, tf.constant(list(captions), tf.string),
                            tf.constant(boxes, tf.float32), tf.constant(texts),
                            score=None if scores is None else tf.constant(scores, tf.float32),
                            record="test record")


@pytest.mark.parametrize("min_score,kept", [(None, ["b", "c"]), (0.5, ["c"]),
                                            (0.0, ["a", "b", "c"])])
def test_min_box_score_keeps_pseudo_boxes_at_or_above_it(min_score, kept):
  ex = _common_example([[0, 0, 0.5, 0.5]] * 3, ["a", "b", "c"], [0.29, 0.3, 0.8])
  opts = common.CleanOptions.from_config(ml_collections.ConfigDict(dict(min_box_score=min_score)))
  out, counts, keep = common.clean(ex, opts)
  assert [t.decode() for t in out["objects"]["refexp"].numpy()] == kept
  assert common.counts_to_dict(counts) == ({"low_score": 3 - len(kept)} if len(kept) < 3 else {})
  assert bool(keep)


def test_clean_drops_bad_regions_and_captions_and_clips_within_tolerance():
  ex = _common_example(
      [[-0.005, 0, 0.5, 1.004], [0, 0, 1.5, 0.5], [0.2, 0.2, 0.2, 0.4], [0, 0, 0.5, 0.5],
       [0, 0, 0.5, 0.5], [float("nan"), 0, 1, 1]],
      ["  ok  ", "far", "flat", "", "x" * 513, "nan"], captions=["a cap", " ", "y" * 600])
  out, counts, keep = common.clean(ex, common.CleanOptions())
  np.testing.assert_allclose(out["objects"]["bbox"].numpy(), [[0, 0, 0.5, 1]])
  assert out["objects"]["refexp"].numpy().tolist() == [b"ok"]
  assert out["captions"].numpy().tolist() == [b"a cap"]
  assert common.counts_to_dict(counts) == dict(box_out_of_range=2, box_empty=1, empty_text=1,
                                               long_text=1, empty_caption=1, long_caption=1)
  assert bool(keep)
  # Nothing usable left: the record is skipped (kept with drop_records=False, for eval).
  ex = _common_example([[0, 0, 1.5, 0.5]], ["far"], captions=[" "])
  _, counts, keep = common.clean(ex, common.CleanOptions())
  assert not bool(keep) and common.counts_to_dict(counts)["no_text"] == 1
  assert bool(common.clean(ex, common.CleanOptions(drop_records=False))[2])


def test_strict_mode_raises_in_graph_naming_record_and_field(jsonl_dir, tok):
  path = jsonl_dir / "strict_graph.jsonl"
  _write_jsonl(path, [{"image": "a.png", "caption": "ok",
                       "regions": [{"box": [0, 0, 150, 40], "text": "too wide"}]}])
  config = _config(dict(source="jsonl", path=str(path)), strict=True)
  it = input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"(?s)strict_graph.jsonl line 1.*field objects/bbox.*outside \[0, 1\]"):
    next(it)


def test_a_source_with_nothing_usable_is_an_error_not_a_hang(tmp_path, tok):
  (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)   # no IEND: cut short
  _write_jsonl(tmp_path / "bad.jsonl", [{"image": "bad.png", "width": 4, "height": 4,
                                         "caption": "x"}] * 3)
  config = _config(dict(source="jsonl", path=str(tmp_path / "bad.jsonl")))
  it = input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"all 3 records .* were skipped"):
    next(it)


def test_image_checks_recognize_complete_and_cut_files():
  png = io.BytesIO()
  Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(png, format="PNG")
  png = png.getvalue()
  jpeg = _jpeg_bytes(11, 13)
  gif = io.BytesIO()
  Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(gif, format="GIF")
  gif = gif.getvalue()
  for data, ok in ((png, True), (jpeg, True), (gif, True), (png[:-20], False),
                   (jpeg[: len(jpeg) // 2], False), (b"hello world", False), (b"", False)):
    assert bool(common.image_bytes_ok(tf.constant(data))) == ok, data[:8]
  assert common.header_size(tf.constant(png)).numpy().tolist() == [7, 9]
  assert common.header_size(tf.constant(jpeg)).numpy().tolist() == [11, 13]
  assert common.header_size(tf.constant(gif)).numpy().tolist() == [-1, -1]


# ------------------------------------------------------------------------------ COCO-JSON
@pytest.fixture(scope="module")
def coco_json(tmp_path_factory):
  d = tmp_path_factory.mktemp("cocojson")
  os.makedirs(d / "images")
  _write_image(d / "images" / "a.png", A_H, A_W, "PNG")
  _write_image(d / "images" / "b.jpg", B_H, B_W, "JPEG")
  data = {
      "images": [{"id": 11, "file_name": "a.png", "width": A_W, "height": A_H},
                 {"id": 12, "file_name": "b.jpg", "width": B_W, "height": B_H},
                 {"id": 13, "file_name": "missing.png", "width": 10, "height": 10},
                 {"id": 14, "file_name": "a.png"}],           # size read from the file
      "annotations": [
          {"id": 1, "image_id": 11, "bbox": [10, 20, 20, 40], "category_id": 1},
          {"id": 2, "image_id": 11, "bbox": [0, 0, 10, 10], "category_id": 2, "iscrowd": 1},
          {"id": 3, "image_id": 12, "bbox": [4, 6, 20, 30], "category_id": 1, "score": 0.7},
          {"id": 4, "image_id": 12, "bbox": [1, 2, 3, 4], "category_id": 99},
          {"id": 5, "image_id": 12, "bbox": [1, 2, -3, 4], "category_id": 1},
          {"id": 6, "image_id": 14, "bbox": [50, 40, 50, 40], "category_id": 2},
          {"id": 7, "image_id": 12, "caption": "a green star"}],
      "categories": [{"id": 1, "name": "red circle"}, {"id": 2, "name": "person"}],
      "captions": [{"image_id": 11, "caption": "a red circle on a white background"}],
  }
  (d / "instances.json").write_text(json.dumps(data))
  return d / "instances.json"


def test_coco_json_regions_captions_and_bad_annotations(coco_json):
  counter = common.BadRecordCounter()
  recs = json_sources.parse_coco_json(str(coco_json), image_dir=str(coco_json.parent / "images"),
                                      counter=counter)
  assert recs.image_ids == [11, 12, 14]
  # [x, y, w, h] = [10, 20, 20, 40] of 100 x 80 -> yxyx [20/80, 10/100, 60/80, 30/100].
  np.testing.assert_allclose(recs.boxes[0], [[0.25, 0.1, 0.75, 0.3]], atol=1e-6)
  assert recs.texts[0] == ["red circle"]
  assert recs.captions[0] == ["a red circle on a white background"]
  # [4, 6, 20, 30] of 40 x 60 -> [6/60, 4/40, 36/60, 24/40].
  np.testing.assert_allclose(recs.boxes[1], [[0.1, 0.1, 0.6, 0.6]], atol=1e-6)
  assert recs.scores[1] == [pytest.approx(0.7)] and recs.captions[1] == ["a green star"]
  np.testing.assert_allclose(recs.boxes[2], [[0.5, 0.5, 1.0, 1.0]], atol=1e-6)
  assert recs.sizes[2] == (A_H, A_W)
  assert dict(counter.counts) == dict(crowd=1, bad_region=1, bad_box=1, missing_file=1)
  assert "instances.json annotations[4] field bbox: " in counter.examples["bad_box"]


def test_coco_json_source_feeds_the_pipeline(coco_json, tok):
  data = dict(source="coco_json", path=str(coco_json), image_dir=str(coco_json.parent / "images"))
  config = _config(data, tasks=("aref",), batch_size=3)
  it = input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1,
                                          extra_fields=("image/id",))
  batch = next(it)
  assert batch["image/id"].tolist() == [11, 12, 14]
  text, box = _split_row(_rows(batch, tok)[0][0], "aref:")
  assert text == "red circle"
  np.testing.assert_allclose(tok.parse_box(box), [0.25, 0.1, 0.75, 0.3], atol=HALF_BIN)
  assert it.data_metrics()["data/instances/parse/crowd"] == 1


# ------------------------------------------------------------------------------ Visual Genome
def test_vg_regions_and_coco_id_exclusion(tmp_path, tok):
  os.makedirs(tmp_path / "VG_100K")
  os.makedirs(tmp_path / "VG_100K_2")
  _write_image(tmp_path / "VG_100K" / "1.jpg", A_H, A_W, "JPEG")
  _write_image(tmp_path / "VG_100K_2" / "2.jpg", B_H, B_W, "JPEG")
  _write_image(tmp_path / "3.jpg", B_H, B_W, "JPEG")
  regions = [
      {"id": 1, "regions": [{"region_id": 1, "image_id": 1, "x": 10, "y": 20, "width": 20,
                             "height": 40, "phrase": "red circle"}]},
      {"id": 2, "regions": [{"region_id": 2, "image_id": 2, "x": 4, "y": 6, "width": 20,
                             "height": 30, "phrase": "green star"},
                            {"region_id": 3, "image_id": 2, "x": 4, "y": 6, "width": 20,
                             "height": 30}]},
      {"id": 3, "regions": [{"region_id": 4, "image_id": 3, "x": 0, "y": 0, "width": 20,
                             "height": 30, "phrase": "blue square"}]},
  ]
  image_data = [
      {"image_id": 1, "width": A_W, "height": A_H, "coco_id": 555,
       "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg"},
      {"image_id": 2, "width": B_W, "height": B_H, "coco_id": None,
       "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg"},
  ]
  (tmp_path / "region_descriptions.json").write_text(json.dumps(regions))
  (tmp_path / "image_data.json").write_text(json.dumps(image_data))
  counter = common.BadRecordCounter()
  recs = json_sources.parse_vg(str(tmp_path / "region_descriptions.json"),
                               image_data=str(tmp_path / "image_data.json"), counter=counter)
  assert recs.paths == [str(tmp_path / "VG_100K" / "1.jpg"), str(tmp_path / "VG_100K_2" / "2.jpg"),
                        str(tmp_path / "3.jpg")]
  assert recs.image_ids == [555, -1, -1]
  np.testing.assert_allclose(recs.boxes[0], [[0.25, 0.1, 0.75, 0.3]], atol=1e-6)
  np.testing.assert_allclose(recs.boxes[1], [[0.1, 0.1, 0.6, 0.6]], atol=1e-6)
  np.testing.assert_allclose(recs.boxes[2], [[0.0, 0.0, 0.5, 0.5]], atol=1e-6)  # size from file
  assert dict(counter.counts) == dict(bad_region=1)

  data = dict(source="vg", path=str(tmp_path / "region_descriptions.json"),
              image_data=str(tmp_path / "image_data.json"))
  config = _config(data, tasks=("gcap",), batch_size=2, exclude_image_ids=[555, 9])
  it = input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1,
                                          extra_fields=("record",))
  seen = {r.decode() for _ in range(3) for r in next(it)["record"]}
  assert seen == {f"{tmp_path}/region_descriptions.json [1] (id 2)",
                  f"{tmp_path}/region_descriptions.json [2] (id 3)"}
  assert it.data_metrics()["data/region_descriptions/parse/excluded_image_id"] == 1


# ------------------------------------------------------------------------------ exclusion list
def test_exclude_image_ids_reads_lists_json_and_text_files(tmp_path):
  (tmp_path / "ids.json").write_text(json.dumps({"image_ids": [5, 3, 3]}))
  (tmp_path / "ids_list.json").write_text(json.dumps([7, 1]))
  (tmp_path / "ids.txt").write_text("4\n2\n\n")
  assert common.load_image_ids(None) is None
  assert common.load_image_ids([3, 1, 3]).tolist() == [1, 3]
  assert common.load_image_ids(str(tmp_path / "ids.json")).tolist() == [3, 5]
  assert common.load_image_ids(str(tmp_path / "ids_list.json")).tolist() == [1, 7]
  assert common.load_image_ids(str(tmp_path / "ids.txt")).tolist() == [2, 4]
  with pytest.raises(ValueError, match="does not exist"):
    common.load_image_ids(str(tmp_path / "nope.json"))
  with pytest.raises(ValueError, match="integer image ids"):
    common.load_image_ids(["a"])


def test_eval_never_skips_a_record_an_unreadable_image_is_an_error(jsonl_dir, tok):
  ds = input_pipeline.make_eval_dataset(
      _config(dict(source="jsonl", path=str(jsonl_dir / "train.jsonl"))), tok, batch_size=4,
      process_index=0, process_count=1)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)train.jsonl line 6.*field image"):
    list(ds.as_numpy_iterator())


def test_source_maps_have_no_stateful_randomness(jsonl_dir, tok):
  # Symbolic checkpointing recomputes in-flight elements on restore: the maps must be pure
  # functions of (stream position, record).
  config = _config(dict(source="jsonl", path=str(jsonl_dir / "train.jsonl")))
  ds = input_pipeline.make_train_dataset(config, tok, process_index=0, process_count=1)
  # "If" is only a conditional's wrapper: the ops of its branches are listed on their own.
  allowed = {"SentencepieceTokenizeOp", "CheckNumerics", "ReadFile", "Assert", "If"}
  graph_def = graph_pb2.GraphDef.FromString(
      ds._as_serialized_graph().numpy())   # pylint: disable=protected-access
  ops = {n.op for f in graph_def.library.function for n in f.node_def}
  stateful = {op for op in ops if getattr(op_def_registry.get(op), "is_stateful", False)}
  assert stateful <= allowed, stateful
  assert any(op.startswith("StatelessRandom") for op in ops)
