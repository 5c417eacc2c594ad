"""TFDS sources (coco, coco_captions, ref_coco) on small datasets in their real TFDS layouts.

The datasets are prepared offline with the real TFDS builder classes (their `_info`, i.e. the
real features, file format and dataset_info.json), only `_split_generators` replaced by a few
hand-written records: what `tfds.builder(name, data_dir=...)` then reads is what a prepared
download would give, so the pipeline runs unchanged. Expected boxes / texts are the records'.
"""
import json

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.ref_coco import ref_coco_dataset_builder
from tensorflow_datasets.object_detection import coco
from tensorflow_datasets.object_detection import coco_captions

from locca_jax.data import input_pipeline
from locca_jax.data.sources import common
from locca_jax.data.sources import tfds_sources

BINS = 500
HALF_BIN = 0.5 / BINS + 1e-6
H, W = 40, 60
LABELS = ["square", "circle", "triangle", "star"] + [f"class {i}" for i in range(4, 80)]


def _image(value=120):
  return np.full((H, W, 3), value, np.uint8)


def _obj(box, label, crowd=False, i=0):
  return dict(id=i, area=10, bbox=tfds.features.BBox(*box), label=label, is_crowd=crowd)


COCO_RECORDS = {   # image/id -> objects (box yxyx, label, is_crowd)
    101: [((0.1, 0.2, 0.5, 0.6), 1, False), ((0.5, 0.5, 0.9, 0.9), 2, True)],
    102: [((0.0, 0.0, 0.25, 0.5), 0, False)],
    103: [],                                          # no objects: nothing to learn
    104: [((0.2, 0.2, 0.2, 0.6), 0, False)],          # zero area: nothing left
    105: [((0.3, 0.1, 0.7, 0.4), 3, False)],
}
CAPTION_RECORDS = {111: ["a red circle", "a circle"], 112: ["a blue square"]}
REF_RECORDS = {   # image/id -> [(box, referring expressions)]
    "train": {201: [((0.1, 0.2, 0.5, 0.6), ["the red circle", "the left circle"]),
                    ((0.5, 0.5, 0.9, 0.9), ["the blue square"])],
              202: [((0.25, 0.25, 0.75, 0.5), ["the green star", "the star",
                                                "the top green star"])],
              203: [((0.0, 0.0, 0.5, 0.5), [])]},          # no expression: nothing left
    "validation": {301: [((0.1, 0.1, 0.3, 0.3), ["the red circle"])],
                   302: [((0.4, 0.4, 0.8, 0.8), ["the blue square"])]},
}


class _FakeCoco(coco.Coco, skip_registration=True):
  name = "coco"

  @classmethod
  def _get_pkg_dir_path(cls):
    return coco.Coco._get_pkg_dir_path()   # pylint: disable=protected-access

  def _split_generators(self, dl_manager):
    self.info.features["objects"]["label"].names = LABELS
    return {"train": self._records()}

  def _records(self):
    for image_id, objs in COCO_RECORDS.items():
      yield image_id, {"image": _image(), "image/id": image_id,
                       "image/filename": f"{image_id}.jpg",
                       "objects": [_obj(b, l, c, i) for i, (b, l, c) in enumerate(objs)]}


class _FakeCocoCaptions(coco_captions.CocoCaptions, skip_registration=True):
  name = "coco_captions"

  @classmethod
  def _get_pkg_dir_path(cls):
    return coco_captions.CocoCaptions._get_pkg_dir_path()   # pylint: disable=protected-access

  def _split_generators(self, dl_manager):
    self.info.features["objects"]["label"].names = LABELS
    return {"train": self._records()}

  def _records(self):
    for image_id, caps in CAPTION_RECORDS.items():
      yield image_id, {"image": _image(), "image/id": image_id,
                       "image/filename": f"{image_id}.jpg",
                       "objects": [_obj((0.1, 0.1, 0.6, 0.6), 1)],
                       "captions": [dict(text=c, id=k) for k, c in enumerate(caps)]}


class _FakeRefCoco(ref_coco_dataset_builder.Builder, skip_registration=True):
  name = "ref_coco"

  @classmethod
  def _get_pkg_dir_path(cls):
    return ref_coco_dataset_builder.Builder._get_pkg_dir_path()   # pylint: disable=protected-access

  def _split_generators(self, dl_manager):
    return {split: self._records(split) for split in REF_RECORDS}

  def _records(self, split):
    for image_id, objs in REF_RECORDS[split].items():
      objects = []
      for i, (box, exprs) in enumerate(objs):
        objects.append(dict(
            id=i, area=10, bbox=tfds.features.BBox(*box), label=1, gt_box_index=i,
            mask=np.zeros((H, W, 3), np.uint8),
            refexp=[dict(refexp_id=k, raw=e) for k, e in enumerate(exprs)]))
      yield image_id, {"image": _image(), "image/id": image_id, "objects": objects,
                       "coco_annotations": [dict(id=i, area=10, bbox=o["bbox"], label=1)
                                            for i, o in enumerate(objects)]}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds_coco"))
  _FakeCoco(config="2017", data_dir=d).download_and_prepare()
  _FakeCocoCaptions(config="2014", data_dir=d).download_and_prepare()
  _FakeRefCoco(config="refcoco_unc", data_dir=d).download_and_prepare()
  return d


def _config(data, tasks=("cap", "aref", "gcap"), **overrides):
  c = ml_collections.ConfigDict(dict(
      seed=0,
      input=dict(
          data=data, batch_size=2, image_size=16, resize="squash", seq_len=48, tasks=tasks,
          shuffle_buffer=0,
          tokenizer=dict(sp_model="locca_jax/assets/locca_shapes_sp.model", box_codec="text",
                         bins=BINS, box_order="xmin ymin xmax ymax"))))
  for k, v in overrides.items():
    c.input[k] = v
  return c


@pytest.fixture(scope="module")
def tok():
  return input_pipeline.make_tokenizer(_config(None).input.tokenizer)


def _common_examples(src, opts=common.CleanOptions(), seeds=(0,)):
  """For each seed: {image/id: (cleaned common example, counts dict, keep)} of the source."""

  def prepare(seed, index, raw):
    ex = src.to_common(raw, tf.stack([seed, index]), index)
    crowd = ex["objects"].pop("crowd", None)
    return (seed,) + common.clean(ex, opts, crowd=crowd)

  ds = tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64)).flat_map(
      lambda seed: src.dataset().enumerate().map(lambda i, raw: (seed, i, raw)))
  out = {s: {} for s in seeds}
  for seed, ex, counts, keep in ds.map(prepare).as_numpy_iterator():
    out[int(seed)][int(ex["image/id"])] = (ex, common.counts_to_dict(counts), bool(keep))
  return out if len(seeds) > 1 else out[seeds[0]]


def test_coco_objects_become_regions_named_by_category(tfds_dir):
  src = tfds_sources.TfdsSource(dict(name="coco/2017", split="train", data_dir=tfds_dir),
                                process_index=0, process_count=1)
  assert src.layout == "coco" and src.num_examples == 5
  got = _common_examples(src)
  ex, counts, keep = got[101]
  np.testing.assert_allclose(ex["objects"]["bbox"], [[0.1, 0.2, 0.5, 0.6]], atol=1e-6)
  assert ex["objects"]["refexp"].tolist() == [b"circle"] and keep
  assert counts == {"crowd": 1}
  assert got[102][0]["objects"]["refexp"].tolist() == [b"square"]
  assert got[103][1:] == ({"no_text": 1}, False)
  assert got[104][1:] == ({"box_empty": 1, "no_text": 1}, False)
  np.testing.assert_allclose(got[105][0]["objects"]["bbox"], [[0.3, 0.1, 0.7, 0.4]], atol=1e-6)
  assert got[105][0]["objects"]["refexp"].tolist() == [b"star"]
  assert all(len(g[0]["captions"]) == 0 for g in got.values())


def test_coco_captions_gives_captions_and_optionally_objects(tfds_dir):
  spec = dict(name="coco_captions", split="train", data_dir=tfds_dir)
  got = _common_examples(tfds_sources.TfdsSource(spec, process_index=0, process_count=1))
  assert {k: v[0]["captions"].tolist() for k, v in got.items()} == {
      111: [b"a red circle", b"a circle"], 112: [b"a blue square"]}
  assert got[111][0]["objects"]["refexp"].tolist() == [b"circle"]
  got = _common_examples(tfds_sources.TfdsSource(dict(spec, objects=False), process_index=0,
                                                 process_count=1))
  assert all(len(v[0]["objects"]["bbox"]) == 0 for v in got.values())


def test_ref_coco_draws_one_expression_per_object_from_the_seed(tfds_dir):
  src = tfds_sources.TfdsSource(dict(name="ref_coco/refcoco_unc", split="train",
                                     data_dir=tfds_dir), process_index=0, process_count=1)
  assert src.layout == "ref_coco"
  drawn = {i: set() for i in range(3)}
  runs = _common_examples(src, seeds=tuple(range(12)))
  again = _common_examples(src, seeds=tuple(range(12)))
  for seed, got in runs.items():
    for image_id, (ex, _, keep) in got.items():
      assert (again[seed][image_id][0]["objects"]["refexp"].tolist() ==
              ex["objects"]["refexp"].tolist())
    ex = got[201][0]["objects"]
    np.testing.assert_allclose(ex["bbox"], [b for b, _ in REF_RECORDS["train"][201]], atol=1e-6)
    drawn[0].add(ex["refexp"][0].decode())
    drawn[1].add(ex["refexp"][1].decode())
    drawn[2].add(got[202][0]["objects"]["refexp"][0].decode())
    assert got[203][1:] == ({"empty_text": 1, "no_text": 1}, False)
  assert drawn == {0: {"the red circle", "the left circle"}, 1: {"the blue square"},
                   2: {"the green star", "the star", "the top green star"}}


def test_ref_coco_train_rows_hold_the_referred_box(tfds_dir, tok):
  config = _config(dict(name="ref_coco/refcoco_unc", split="train", data_dir=tfds_dir),
                   tasks=("aref", "gcap"))
  it = input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1,
                                          extra_fields=("image/id",))
  for _ in range(6):
    batch = next(it)
    for image_id, rows in zip(batch["image/id"], batch["text"]):
      objects = REF_RECORDS["train"][int(image_id)]
      aref = tok.decode(rows[0])[len("aref:"):].strip()
      text, _, box = aref.partition(" : ")
      expected = [b for b, exprs in objects if text in exprs]
      assert expected, (image_id, aref)
      np.testing.assert_allclose(tok.parse_box(box), expected[0], atol=HALF_BIN)
      gcap = tok.decode(rows[1])[len("gcap:"):].strip()
      box, _, text = gcap.partition(" : ")
      assert any(text in exprs and np.allclose(tok.parse_box(box), b, atol=HALF_BIN)
                 for b, exprs in objects), gcap
  assert set(REF_RECORDS["train"]) - {203} >= set(batch["image/id"].tolist())
  assert it.data_metrics()["data/ref_coco_refcoco_unc/stream/no_text"] >= 1


def test_ref_coco_eval_sees_every_validation_image_once(tfds_dir, tok):
  config = _config(dict(name="ref_coco/refcoco_unc", split="validation", data_dir=tfds_dir),
                   tasks=("aref",))
  seen = []
  for p in range(2):
    ds = input_pipeline.make_eval_dataset(config, tok, batch_size=2, process_index=p,
                                          process_count=2, extra_fields=("image/id",))
    for b in ds.as_numpy_iterator():
      seen += b["image/id"][b["mask_valid"] == 1].tolist()
  assert sorted(seen) == [301, 302]


def test_mixture_of_tfds_and_file_sources_with_excluded_images(tfds_dir, tok, tmp_path):
  (tmp_path / "refcoco_eval_ids.json").write_text("[101, 202, 999]")
  tf.io.write_file(str(tmp_path / "a.png"), tf.io.encode_png(_image()))
  (tmp_path / "extra.jsonl").write_text(json.dumps(
      {"image": "a.png", "image_id": 900, "regions": [{"box": [0, 0, 30, 20], "text": "a"}]}))
  data = [dict(name="coco/2017", split="train", data_dir=tfds_dir, weight=1.0),
          dict(name="ref_coco/refcoco_unc", split="train", data_dir=tfds_dir, weight=1.0,
               label="refcoco"),
          dict(source="jsonl", path=str(tmp_path / "extra.jsonl"), weight=1.0)]
  config = _config(data, tasks=("aref",), batch_size=4,
                   exclude_image_ids=str(tmp_path / "refcoco_eval_ids.json"),
                   count_excluded=True)
  it = input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1,
                                          extra_fields=("image/id",))
  ids = np.concatenate([next(it)["image/id"] for _ in range(8)])
  assert set(ids.tolist()) == {102, 105, 201, 900}
  metrics = it.data_metrics()
  # Counted once at start-up with a reduce over image/id, and as read by the stream.
  assert metrics["data/coco_2017/parse/excluded_image_id"] == 1
  assert metrics["data/refcoco/parse/excluded_image_id"] == 1
  assert metrics["data/coco_2017/stream/excluded_image_id"] >= 1
  assert metrics["data/refcoco/stream/excluded_image_id"] >= 1


def test_wrong_layout_names_the_missing_features(tfds_dir):
  with pytest.raises(ValueError, match=r"ref_coco/refcoco_unc: features \['objects/is_crowd'\] "
                     r"missing for layout 'coco'"):
    tfds_sources.TfdsSource(dict(name="ref_coco/refcoco_unc", split="train", data_dir=tfds_dir,
                                 layout="coco"), process_index=0, process_count=1)
