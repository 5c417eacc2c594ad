"""File sources parsed on the host: JSONL, COCO-JSON, Visual Genome region descriptions.

Each file is parsed once at start-up (only this process's records: record i is read by process
i % process_count), pixel boxes are converted ONCE to normalized yxyx with `locca_jax.boxes`,
and the records become a `tf.data.Dataset.from_tensor_slices` (small: paths, texts, boxes).
Images are read in graph with `tf.io.read_file` (local paths or any tf.io.gfile URL); relative
image paths are resolved against `image_dir` (default, or when "": the JSON file's directory).

Box normalization needs each image's size: from the record ("width" / "height", COCO image
entries, VG image_data.json) or else read from the image header on the host (PIL through
tf.io.gfile; slower for remote files, so give sizes when you can). The declared size is checked
against the JPEG / PNG header in graph ("image_size_mismatch").

Formats (also in the README):

JSONL (`source="jsonl"`), one JSON object per line (blank lines ignored):
  {"image": "imgs/0001.jpg",                   # required; relative to image_dir
   "caption": "a dog on a sofa",               # or a list of captions; optional
   "image_id": 42,                             # optional int (for exclude_image_ids)
   "width": 640, "height": 480,                # optional (read from the file if absent)
   "regions": [                                # optional
     {"box": [10, 20, 200, 300],               # pixels, [xmin, ymin, xmax, ymax]
      "box_format": "xyxy",                    # or "xywh" ([x, y, width, height]); optional
      "text": "a brown dog",                   # required per region
      "score": 0.87}]}                         # optional detector score (default 1.0)
  A record needs a caption or a region.

COCO-JSON (`source="coco_json"`), the COCO instances layout:
  {"images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480}, ...],
   "annotations": [{"id": 5, "image_id": 1, "bbox": [x, y, w, h], "category_id": 3,
                    "score": 0.9 (optional), "iscrowd": 0 (optional),
                    "text": "..." (optional; overrides the category name)},
                   {"image_id": 1, "caption": "..."}  (an annotation without bbox but with
                                                       caption is a caption, as in COCO's
                                                       captions_*.json)],
   "categories": [{"id": 3, "name": "dog"}, ...],
   "captions": [{"image_id": 1, "caption": "..."}]   (optional)}
  `captions_path=` names a second file (e.g. COCO's captions_train2017.json) whose
  "annotations" captions are merged by image id. Crowd annotations are skipped ("crowd")
  unless `drop_crowd=False`. image/id = the image's "id".

Visual Genome (`source="vg"`): `path` = region_descriptions.json,
  [{"id": 1, "regions": [{"region_id": 7, "image_id": 1, "x": 10, "y": 20, "width": 100,
                          "height": 50, "phrase": "a man riding a bike"}, ...]}, ...]
  with the images at image_dir/{id}.jpg, image_dir/VG_100K/{id}.jpg or
  image_dir/VG_100K_2/{id}.jpg. `image_data=` (VG's image_data.json: [{"image_id", "width",
  "height", "coco_id", "url"}]) gives sizes, the sub-directory (from the url) and COCO ids:
  image/id = coco_id (or -1), so `exclude_image_ids` also removes VG images of RefCOCO's
  val/test COCO images.
"""
import collections
import json
import os

import numpy as np
import tensorflow as tf

from locca_jax import boxes as boxlib
from locca_jax.data.sources import common

SOURCES = ("jsonl", "coco_json", "vg")
BOX_FORMATS = ("xyxy", "xywh")



class Records:
  """Parsed records, column by column (all boxes normalized yxyx)."""

  def __init__(self):
    self.names, self.paths, self.image_ids, self.sizes = [], [], [], []
    self.captions, self.boxes, self.texts, self.scores = [], [], [], []

  def add(self, name, path, image_id, size, captions, boxes, texts, scores):
    self.names.append(name)
    self.paths.append(path)
    self.image_ids.append(int(image_id))
    self.sizes.append(size)
    self.captions.append(list(captions))
    self.boxes.append(np.asarray(boxes, np.float32).reshape(-1, 4))
    self.texts.append(list(texts))
    self.scores.append([float(s) for s in scores])

  def __len__(self):
    return len(self.paths)

  def to_dataset(self):
    """tf.data.Dataset of dict(record, path, image/id, image/size, captions [C], bbox [N, 4],
    refexp [N], score [N])."""
    strings = lambda xs: tf.constant(xs, tf.string) if xs else tf.zeros([0], tf.string)
    ragged = lambda rows, values: tf.RaggedTensor.from_row_lengths(
        values, np.array([len(r) for r in rows], np.int64))
    flat = lambda rows: [x for r in rows for x in r]
    boxes = (np.concatenate(self.boxes) if self.boxes else np.zeros([0, 4], np.float32))
    return tf.data.Dataset.from_tensor_slices({
        "record": strings(self.names),
        "path": strings(self.paths),
        "image/id": np.array(self.image_ids, np.int64),
        "image/size": np.array(self.sizes, np.int32).reshape(-1, 2),
        "captions": ragged(self.captions, strings(flat(self.captions))),
        "bbox": ragged(self.boxes, boxes.astype(np.float32)),
        "refexp": ragged(self.texts, strings(flat(self.texts))),
        "score": ragged(self.scores, np.array(flat(self.scores), np.float32)),
    })


class _Parser:
  """Shared host-side checks: image files and sizes, box conversion, exclusion."""

  def __init__(self, counter, check_files, exclude_ids):
    self.counter = counter
    self.check_files = check_files
    self.exclude_ids = set(exclude_ids.tolist()) if exclude_ids is not None else set()

  def excluded(self, image_id, where):
    if image_id >= 0 and image_id in self.exclude_ids:
      self.counter.note("excluded_image_id", where)
      return True
    return False

  def image_size(self, path, where, declared):
    """(height, width), or None when the file is missing / unreadable (counted)."""
    if declared is not None:
      if self.check_files and not tf.io.gfile.exists(path):
        self.counter.skip("missing_file", where, f"image file {path!r} does not exist")
        return None
      return declared
    from PIL import Image  # pylint: disable=g-import-not-at-top
    try:
      with tf.io.gfile.GFile(path, "rb") as f:
        with Image.open(f) as im:
          width, height = im.size
    except (tf.errors.NotFoundError, FileNotFoundError):
      self.counter.skip("missing_file", where, f"image file {path!r} does not exist")
      return None
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds.
      self.counter.skip("unreadable_image", where,
                        f"image file {path!r} is not a readable image ({e})")
      return None
    return int(height), int(width)

  def declared_size(self, obj, where, what="width/height"):
    """(height, width) from obj["height"], obj["width"]; None if absent; False if invalid."""
    w, h = obj.get("width"), obj.get("height")
    if w is None and h is None:
      return None
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and
             float(v) == int(v) for v in (w, h))
    if not ok:
      self.counter.skip("bad_record", where, f"fields {what} = {w!r}/{h!r} (expected positive "
                        "integers: the image size in pixels)")
      return False
    return int(h), int(w)

  def convert(self, items, size):
    """items: [(location, box, fmt)] -> (indices kept, normalized yxyx [k, 4]); bad boxes are
    counted (or raise when strict) with their location ("file line 3 field regions[0].box").

    Converts all boxes of one format at once with locca_jax.boxes; only when that raises are
    they converted one by one, to skip just the bad ones.
    """
    height, width = size
    fns = dict(xyxy=boxlib.from_xyxy_pixels, xywh=boxlib.from_xywh_pixels)
    kept, out = [], []
    for fmt in BOX_FORMATS:
      group = [(i, loc, box) for i, (loc, box, f) in enumerate(items) if f == fmt]
      if not group:
        continue
      try:
        conv = fns[fmt]([b for _, _, b in group], height, width)
        kept += [i for i, _, _ in group]
        out.append(np.asarray(conv))
        continue
      except ValueError:
        pass
      for i, loc, box in group:
        try:
          out.append(np.asarray(fns[fmt](box, height, width)).reshape(1, 4))
          kept.append(i)
        except ValueError as e:
          self.counter.skip("bad_box", loc, str(e))
    order = np.argsort(kept, kind="stable")
    boxes = np.concatenate(out) if out else np.zeros([0, 4])
    return [kept[i] for i in order], boxes[order] if len(kept) else boxes


def _is_text(x):
  return isinstance(x, str)


def _is_number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _load_json(path, what):
  if not tf.io.gfile.exists(path):
    raise ValueError(f"{what}: file {path!r} does not exist")
  with tf.io.gfile.GFile(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e


# ------------------------------------------------------------------------------ JSONL
def parse_jsonl(path, *, image_dir=None, box_format="xyxy", check_files=True,
                exclude_ids=None, counter=None, process_index=0, process_count=1):
  """JSONL file -> Records of this process (line i, counting non-blank lines, goes to process
  i % process_count). Bad lines / regions are counted in `counter` (or raise if strict)."""
  counter = counter or common.BadRecordCounter()
  parser = _Parser(counter, check_files, exclude_ids)
  if box_format not in BOX_FORMATS:
    raise ValueError(f"{path}: box_format={box_format!r} (expected one of {BOX_FORMATS})")
  if not tf.io.gfile.exists(path):
    raise ValueError(f"config.input.data.path: JSONL file {path!r} does not exist")
  base = image_dir or os.path.dirname(path)
  records = Records()
  k = -1
  with tf.io.gfile.GFile(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      k += 1
      if k % process_count != process_index:
        continue
      where = f"{path} line {lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        counter.skip("malformed_json", where, f"not valid JSON ({e})")
        continue
      _jsonl_record(obj, where, base, box_format, parser, records)
  return records


def _jsonl_record(obj, where, base, box_format, parser, records):
  counter = parser.counter
  if not isinstance(obj, dict):
    counter.skip("bad_record", where, f"expected a JSON object, got {type(obj).__name__}")
    return
  image = obj.get("image")
  if not _is_text(image) or not image:
    counter.skip("bad_record", where, f"field image = {image!r} (expected the image file path, "
                 "a non-empty string)")
    return
  caption = obj.get("caption", [])
  captions = [caption] if _is_text(caption) else caption
  if not isinstance(captions, list) or not all(_is_text(c) for c in captions):
    counter.skip("bad_record", where, f"field caption = {caption!r} (expected a string or a "
                 "list of strings)")
    return
  image_id = obj.get("image_id", -1)
  if not isinstance(image_id, int) or isinstance(image_id, bool):
    counter.skip("bad_record", where, f"field image_id = {image_id!r} (expected an integer)")
    return
  regions = obj.get("regions", [])
  if not isinstance(regions, list):
    counter.skip("bad_record", where, f"field regions = {regions!r} (expected a list of "
                 "{'box': [...], 'text': ...})")
    return
  if parser.excluded(image_id, where):
    return
  declared = parser.declared_size(obj, where)
  if declared is False:
    return
  path = common.resolve_path(base, image)
  size = parser.image_size(path, where, declared)
  if size is None:
    return
  items, texts, scores = [], [], []
  for i, r in enumerate(regions):
    field = f"regions[{i}]"
    if not isinstance(r, dict):
      counter.skip("bad_region", f"{where} field {field}", f"expected a JSON object, got {r!r}")
      continue
    fmt = r.get("box_format", box_format)
    text, score = r.get("text"), r.get("score", 1.0)
    if fmt not in BOX_FORMATS:
      counter.skip("bad_region", f"{where} field {field}.box_format",
                   f"{fmt!r} (expected one of {BOX_FORMATS})")
    elif not _is_text(text):
      counter.skip("bad_region", f"{where} field {field}.text",
                   f"{text!r} (expected a string)")
    elif not _is_number(score):
      counter.skip("bad_region", f"{where} field {field}.score",
                   f"{score!r} (expected a number)")
    elif "box" not in r:
      counter.skip("bad_box", f"{where} field {field}.box",
                   f"missing (expected {_FORMAT_TEXT[fmt]} in pixels)")
    else:
      items.append((f"{where} field {field}.box", r["box"], fmt))
      texts.append(text)
      scores.append(score)
  keep, boxes = parser.convert(items, size)
  texts, scores = [texts[i] for i in keep], [scores[i] for i in keep]
  if not captions and not texts:
    counter.note("no_text", where, "no caption and no usable region (expected field caption "
                 "and/or regions)")
    return
  records.add(where, path, image_id, size, captions, boxes, texts, scores)


_FORMAT_TEXT = dict(xyxy="[xmin, ymin, xmax, ymax]", xywh="[x, y, width, height]")


# ------------------------------------------------------------------------------ COCO-JSON
def parse_coco_json(path, *, image_dir=None, captions_path=None, drop_crowd=True,
                    check_files=True, exclude_ids=None, counter=None, process_index=0,
                    process_count=1):
  """COCO-style JSON -> Records of this process (images[i] goes to process i % count)."""
  counter = counter or common.BadRecordCounter()
  parser = _Parser(counter, check_files, exclude_ids)
  data = _load_json(path, "config.input.data.path (COCO-JSON)")
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise ValueError(f"{path}: expected a COCO JSON object with an 'images' list (and "
                     "'annotations', 'categories')")
  base = image_dir or os.path.dirname(path)
  categories = {}
  for i, c in enumerate(data.get("categories", [])):
    if not isinstance(c, dict) or not _is_text(c.get("name")) or "id" not in c:
      raise ValueError(f"{path} categories[{i}]: {c!r} (expected {{'id': int, 'name': str}})")
    categories[c["id"]] = c["name"]

  anns, caps = collections.defaultdict(list), collections.defaultdict(list)
  lists = [(path, "annotations", data.get("annotations", [])),
           (path, "captions", data.get("captions", []))]
  if captions_path:
    extra = _load_json(captions_path, "config.input.data.captions_path")
    lists.append((captions_path, "annotations", extra.get("annotations", [])
                  if isinstance(extra, dict) else extra))
  for file, key, items in lists:
    if not isinstance(items, list):
      raise ValueError(f"{file}: field {key} is {type(items).__name__} (expected a list)")
    for i, a in enumerate(items):
      where = f"{file} {key}[{i}]"
      if not isinstance(a, dict) or "image_id" not in a:
        counter.skip("bad_region", where, f"{a!r} (expected an object with image_id)")
      elif "bbox" not in a and "caption" in a:
        caps[a["image_id"]].append((where, a["caption"]))
      else:
        anns[a["image_id"]].append((where, a))

  records = Records()
  for i, im in enumerate(data["images"]):
    if i % process_count != process_index:
      continue
    where = f"{path} images[{i}]"
    if not isinstance(im, dict) or not _is_text(im.get("file_name")) or "id" not in im:
      counter.skip("bad_record", where, f"{im!r} (expected {{'id', 'file_name', 'width', "
                   "'height'}})")
      continue
    image_id = im["id"]
    where = f"{path} images[{i}] (id {image_id})"
    numeric_id = image_id if isinstance(image_id, int) and not isinstance(image_id, bool) else -1
    if parser.excluded(numeric_id, where):
      continue
    declared = parser.declared_size(im, where)
    if declared is False:
      continue
    file = common.resolve_path(base, im["file_name"])
    size = parser.image_size(file, where, declared)
    if size is None:
      continue
    captions = []
    for cwhere, c in caps.get(image_id, []):
      if _is_text(c):
        captions.append(c)
      else:
        counter.skip("bad_region", f"{cwhere} field caption", f"{c!r} (expected a string)")
    items, texts, scores = [], [], []
    for awhere, a in anns.get(image_id, []):
      text = a.get("text", categories.get(a.get("category_id")))
      score = a.get("score", 1.0)
      if drop_crowd and a.get("iscrowd", 0):
        counter.note("crowd", awhere)
      elif not _is_text(text):
        counter.skip("bad_region", f"{awhere} field category_id",
                     f"{a.get('category_id')!r} is not in categories (and no 'text' given)")
      elif not _is_number(score):
        counter.skip("bad_region", f"{awhere} field score", f"{score!r} (expected a number)")
      else:
        items.append((f"{awhere} field bbox", a.get("bbox"), "xywh"))
        texts.append(text)
        scores.append(score)
    keep, boxes = parser.convert(items, size)
    texts, scores = [texts[k] for k in keep], [scores[k] for k in keep]
    if not captions and not texts:
      counter.note("no_text", where, "no caption and no usable annotation")
      continue
    records.add(where, file, numeric_id, size, captions, boxes, texts, scores)
  return records


# ------------------------------------------------------------------------------ Visual Genome
def parse_vg(path, *, image_dir=None, image_data=None, check_files=True, exclude_ids=None,
             counter=None, process_index=0, process_count=1):
  """VG region_descriptions.json -> Records of this process (entry i -> process i % count)."""
  counter = counter or common.BadRecordCounter()
  parser = _Parser(counter, check_files, exclude_ids)
  data = _load_json(path, "config.input.data.path (VG region_descriptions.json)")
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of {{'id', 'regions'}} (VG "
                     "region_descriptions.json)")
  base = image_dir or os.path.dirname(path)
  meta = {}
  if image_data:
    for i, m in enumerate(_load_json(image_data, "config.input.data.image_data")):
      key = m.get("image_id", m.get("id")) if isinstance(m, dict) else None
      if key is None:
        raise ValueError(f"{image_data}[{i}]: {m!r} (expected {{'image_id', 'width', "
                         "'height', 'coco_id', 'url'}})")
      meta[key] = m
  records = Records()
  for i, entry in enumerate(data):
    if i % process_count != process_index:
      continue
    where = f"{path} [{i}]"
    vg_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
    if vg_id is None or not isinstance(entry.get("regions"), list):
      counter.skip("bad_record", where, f"expected {{'id': int, 'regions': [...]}}, got "
                   f"{str(entry)[:200]}")
      continue
    where = f"{path} [{i}] (id {vg_id})"
    m = meta.get(vg_id, {})
    coco_id = m.get("coco_id")
    image_id = coco_id if isinstance(coco_id, int) else -1
    if parser.excluded(image_id, where):
      continue
    declared = parser.declared_size(m, where, "image_data width/height") if m else None
    if declared is False:
      continue
    file = _vg_image_path(base, vg_id, m.get("url"))
    if file is None:
      counter.skip("missing_file", where, f"no image {vg_id}.jpg in {base} (or its VG_100K, "
                   "VG_100K_2 sub-directories)")
      continue
    size = parser.image_size(file, where, declared)
    if size is None:
      continue
    items, texts = [], []
    for k, r in enumerate(entry["regions"]):
      field = f"regions[{k}]"
      if not isinstance(r, dict) or not _is_text(r.get("phrase")):
        counter.skip("bad_region", f"{where} field {field}",
                     f"{r!r} (expected {{'x', 'y', 'width', 'height', 'phrase'}})")
        continue
      items.append((f"{where} field {field} x/y/width/height",
                    [r.get("x"), r.get("y"), r.get("width"), r.get("height")], "xywh"))
      texts.append(r["phrase"])
    keep, boxes = parser.convert(items, size)
    texts = [texts[k] for k in keep]
    if not texts:
      counter.note("no_text", where, "no usable region")
      continue
    records.add(where, file, image_id, size, [], boxes, texts, [1.0] * len(texts))
  return records


def _vg_image_path(base, vg_id, url):
  if isinstance(url, str) and "/" in url:
    parts = url.rstrip("/").split("/")
    return os.path.join(base, parts[-2], parts[-1])
  candidates = [os.path.join(base, d, f"{vg_id}.jpg") for d in ("", "VG_100K", "VG_100K_2")]
  for c in candidates:
    if tf.io.gfile.exists(c):
      return c
  return None


# ------------------------------------------------------------------------------ the source
class JsonSource:
  """A JSONL / COCO-JSON / VG file as a source of common examples, for one process.

  Attributes: label, path, records (this process's), num_examples, exclude, check_images,
  parse_counter.
  """

  def __init__(self, spec, *, process_index, process_count, exclude_ids=None, strict=False):
    spec = dict(spec)
    self.kind = spec["source"]
    if self.kind not in SOURCES:
      raise ValueError(f"config.input.data.source={self.kind!r} unknown (expected 'tfds' or "
                       f"one of {SOURCES})")
    if not spec.get("path"):
      raise ValueError(f"config.input.data: source={self.kind!r} needs path=... (the "
                       f"{self.kind} file)")
    self.path = spec["path"]
    self.label = spec.get("label") or os.path.splitext(os.path.basename(self.path))[0]
    self.exclude = bool(spec.get("exclude", True))
    self.check_images = True   # Image files are checked in graph (complete, declared size).
    self.parse_counter = common.BadRecordCounter(strict, self.label)
    kw = dict(image_dir=spec.get("image_dir"), check_files=bool(spec.get("check_files", True)),
              exclude_ids=exclude_ids if self.exclude else None, counter=self.parse_counter,
              process_index=process_index, process_count=process_count)
    if self.kind == "jsonl":
      self.records = parse_jsonl(self.path, box_format=spec.get("box_format", "xyxy"), **kw)
    elif self.kind == "coco_json":
      self.records = parse_coco_json(self.path, captions_path=spec.get("captions_path"),
                                     drop_crowd=bool(spec.get("drop_crowd", True)), **kw)
    else:
      self.records = parse_vg(self.path, image_data=spec.get("image_data"), **kw)
    self.num_examples = len(self.records)

  def dataset(self):
    """This process's records, finite, in file order (images not read yet)."""
    return self.records.to_dataset()

  def to_common(self, raw, seed, index):  # pylint: disable=unused-argument
    """In graph: parsed record -> common example (reads the image file)."""
    return common.make_common(
        tf.io.read_file(raw["path"]), raw["captions"], raw["bbox"], raw["refexp"],
        score=raw["score"], image_id=raw["image/id"], image_size=raw["image/size"],
        record=raw["record"])
