"""Mixtures of sources, per-process reading, eval over files, the custom-data config.

Every test writes its own small files in the documented layouts (see test_sources.py).
"""
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from locca_jax.data import input_pipeline
from locca_jax.data import iterator_checkpoint

A_H, A_W = 80, 100


def _config(data, tasks=("cap", "aref", "gcap"), **overrides):
  c = ml_collections.ConfigDict(dict(
      seed=0,
      input=dict(
          data=data, batch_size=4, image_size=16, resize="squash", seq_len=48, tasks=tasks,
          shuffle_buffer=0,
          tokenizer=dict(sp_model="locca_jax/assets/locca_shapes_sp.model", box_codec="text",
                         bins=500, box_order="xmin ymin xmax ymax"))))
  for k, v in overrides.items():
    c.input[k] = v
  return c


@pytest.fixture(scope="module")
def tok():
  return input_pipeline.make_tokenizer(_config(None).input.tokenizer)


def _write_image(path, height, width, fmt, value=128):
  arr = np.full((height, width, 3), value, np.uint8)
  Image.fromarray(arr).save(path, format=fmt)


def _write_jsonl(path, lines):
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


# ------------------------------------------------------------------------------ mixtures
@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
  d = tmp_path_factory.mktemp("mix")
  _write_image(d / "a.png", A_H, A_W, "PNG")
  _write_jsonl(d / "reds.jsonl", [{"image": "a.png", "caption": "a red circle", "image_id": i,
                                   "width": A_W, "height": A_H} for i in range(12)])
  _write_jsonl(d / "blues.jsonl", [{"image": "a.png", "caption": "a blue square",
                                    "image_id": 100 + i, "width": A_W, "height": A_H}
                                   for i in range(12)])
  return [dict(source="jsonl", path=str(d / "reds.jsonl"), weight=3.0),
          dict(source="jsonl", path=str(d / "blues.jsonl"), weight=1.0, shuffle_buffer=8)]


def _mix_config(two_sources, **overrides):
  return _config(two_sources, tasks=("cap",), batch_size=8, shuffle_buffer=16, **overrides)


def test_mixture_follows_the_weights(two_sources, tok):
  it = input_pipeline.make_train_iterator(_mix_config(two_sources), tok, process_index=0,
                                          process_count=1, extra_fields=("image/id",))
  ids = np.concatenate([next(it)["image/id"] for _ in range(50)])
  frac_reds = float(np.mean(ids < 100))
  assert abs(frac_reds - 0.75) < 0.06, frac_reds   # 400 draws: 4 standard deviations.
  assert set(ids[ids < 100]) == set(range(12)) and set(ids[ids >= 100]) == set(range(100, 112))


def test_mixture_is_deterministic_and_resumes_exactly(two_sources, tok, tmp_path):
  config = _mix_config(two_sources, exclude_image_ids=[3, 103])
  make = lambda: input_pipeline.make_train_iterator(config, tok, process_index=0,
                                                    process_count=1, extra_fields=("image/id",))
  it = make()
  first = [next(it) for _ in range(3)]
  again = make()
  for a in first:
    b = next(again)
    np.testing.assert_array_equal(a["image/id"], b["image/id"])
    np.testing.assert_array_equal(a["text"], b["text"])
  assert not {3, 103} & set(np.concatenate([b["image/id"] for b in first]).tolist())
  handler = iterator_checkpoint.IteratorCheckpointHandler()
  handler.save(tmp_path, args=iterator_checkpoint.IteratorSave(it))
  expected = [next(it) for _ in range(2)]
  fresh = make()
  handler.restore(tmp_path, args=iterator_checkpoint.IteratorRestore(fresh))
  for a in expected:
    b = next(fresh)
    np.testing.assert_array_equal(a["image/id"], b["image/id"])
    np.testing.assert_array_equal(a["text"], b["text"])
    np.testing.assert_array_equal(a["image"], b["image"])
  assert fresh.data_metrics() == it.data_metrics() == {
      "data/reds/parse/excluded_image_id": 1, "data/blues/parse/excluded_image_id": 1}


def test_mixture_config_errors_name_the_entry(two_sources, tok):
  bad = [dict(two_sources[0]), dict(two_sources[1], weight=0)]
  with pytest.raises(ValueError, match=r"config.input.data\[1\].weight=0"):
    input_pipeline.make_train_iterator(_mix_config(bad), tok, process_index=0, process_count=1)
  bad = [dict(two_sources[0], sorce="jsonl")]
  with pytest.raises(ValueError, match=r"config.input.data\[0\]: unknown keys \['sorce'\]"):
    input_pipeline.make_train_iterator(_mix_config(bad), tok, process_index=0, process_count=1)


# ------------------------------------------------------------------------------ processes
def test_processes_read_disjoint_records_with_equal_batches(two_sources, tok):
  config = _config(two_sources[0], tasks=("cap",), batch_size=4)
  ids = []
  for p in range(2):
    it = input_pipeline.make_train_iterator(config, tok, process_index=p, process_count=2,
                                            extra_fields=("image/id",))
    batches = [next(it) for _ in range(3)]          # 6 records per process = one pass
    assert all(b["image"].shape[0] == 2 for b in batches)
    ids.append(set(np.concatenate([b["image/id"] for b in batches]).tolist()))
  assert ids[0] == set(range(0, 12, 2)) and ids[1] == set(range(1, 12, 2))


def test_eval_over_a_jsonl_file_sees_every_record_once(two_sources, tok):
  config = _config(two_sources[0], tasks=("cap",))
  seen, num_batches = [], set()
  for p in range(2):
    ds = input_pipeline.make_eval_dataset(config, tok, batch_size=4, process_index=p,
                                          process_count=2, extra_fields=("image/id",))
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == int(ds.cardinality())
    num_batches.add(len(batches))
    for b in batches:
      seen += b["image/id"][b["mask_valid"] == 1].tolist()
  assert len(num_batches) == 1
  assert sorted(seen) == list(range(12))


def test_custom_data_config_trains_from_its_three_sources(tmp_path, tok):
  from configs import locca_custom  # pylint: disable=g-import-not-at-top
  _write_image(tmp_path / "a.png", A_H, A_W, "PNG")
  _write_jsonl(tmp_path / "pseudo.jsonl", [
      {"image": "a.png", "caption": "a red circle", "image_id": 1,
       "regions": [{"box": [10, 20, 30, 60], "text": "red circle", "score": 0.9}]},
      {"image": "a.png", "caption": "a blue square", "image_id": 2}])
  (tmp_path / "instances.json").write_text(json.dumps({
      "images": [{"id": 3, "file_name": "a.png", "width": A_W, "height": A_H},
                 {"id": 4, "file_name": "a.png", "width": A_W, "height": A_H}],
      "annotations": [{"id": 1, "image_id": 3, "bbox": [10, 20, 20, 40], "category_id": 1},
                      {"id": 2, "image_id": 4, "bbox": [10, 20, 20, 40], "category_id": 1}],
      "categories": [{"id": 1, "name": "red circle"}]}))
  os.makedirs(tmp_path / "VG_100K")
  _write_image(tmp_path / "VG_100K" / "7.jpg", A_H, A_W, "JPEG")
  (tmp_path / "regions.json").write_text(json.dumps([{"id": 7, "regions": [
      {"x": 10, "y": 20, "width": 20, "height": 40, "phrase": "red circle"}]}]))
  (tmp_path / "ids.json").write_text(json.dumps({"image_ids": [2, 4]}))

  config = locca_custom.get_config("runlocal")
  config.input.data.pseudo.path = str(tmp_path / "pseudo.jsonl")
  config.input.data.coco.path = str(tmp_path / "instances.json")
  config.input.data.coco.image_dir = str(tmp_path)
  config.input.data.coco.captions_path = ""
  config.input.data.vg.path = str(tmp_path / "regions.json")
  config.input.data.vg.image_dir = str(tmp_path)
  config.input.data.vg.image_data = ""
  config.input.exclude_image_ids = str(tmp_path / "ids.json")
  config.input.batch_size, config.input.image_size, config.input.shuffle_buffer = 6, 16, 4
  it = input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1,
                                          extra_fields=("image/id",))
  batch = next(it)
  assert batch["text"].shape == (6, 3, config.input.seq_len)
  ids = set(np.concatenate([batch["image/id"]] + [next(it)["image/id"] for _ in range(5)]))
  assert ids == {1, 3, -1}   # -1: the VG image (no image_data, so no COCO id)
  metrics = it.data_metrics()
  assert metrics["data/pseudo/parse/excluded_image_id"] == 1
  assert metrics["data/coco/parse/excluded_image_id"] == 1
