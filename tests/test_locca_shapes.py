"""Tests for the synthetic `locca_shapes` dataset: pixels, boxes, refexps, captions, TFDS builder."""
import collections
import colorsys
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from locca_jax.data import locca_shapes

S = 128
# The test's own vocabulary and hue bands (degrees), so nothing below trusts the generator's tables.
COLOR_HUES = {"red": (-15, 15), "orange": (15, 40), "yellow": (40, 75), "green": (75, 165),
              "blue": (165, 255), "purple": (255, 345)}
SHAPE_WORDS = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZE_WORDS = ("small", "large")


def _scenes(n, split="validation"):
  return [locca_shapes.generate_example(locca_shapes.split_rng(split, i), S) for i in range(n)]


@pytest.fixture(scope="module")
def scenes():
  return _scenes(500)


COLOR_SCENE = dict(min_objects=1, max_objects=3, shapes=("square",), backgrounds=("solid",))


@pytest.fixture(scope="module")
def color_scenes():
  """Scenes of the `colors` config's kind: 1-3 squares on solid backgrounds."""
  scene = locca_shapes.Scene(**COLOR_SCENE)
  return [locca_shapes.generate_example(locca_shapes.split_rng("validation", i), S, scene)
          for i in range(300)]


@pytest.fixture(scope="module")
def saturated(scenes):
  """Per scene, the pixels whose channels differ by more than 80: coloured, not grey."""
  return [np.ptp(ex["image"].astype(np.int16), axis=-1) > 80 for ex in scenes]


def _pixel_box(obj):
  box = np.asarray(obj["bbox"]) * S
  assert np.allclose(box, box.round()), f"box {obj['bbox']} is not on pixel edges"
  return box.round().astype(int)


def _tight_box(mask):
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1])


def _region(box, pad=2):
  y0, x0, y1, x1 = box
  return slice(max(y0 - pad, 0), y1 + pad), slice(max(x0 - pad, 0), x1 + pad), (
      max(y0 - pad, 0), max(x0 - pad, 0))


def _hue_name(rgb):
  h = colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255.0))[0] * 360
  h = h - 360 if h >= 345 else h
  return next(name for name, (lo, hi) in COLOR_HUES.items() if lo <= h < hi)


def test_boxes_are_tight_boxes_of_pixels_differing_from_a_solid_background(scenes):
  solid = [ex for ex in scenes[:300] if "noisy" not in ex["background"]
           and "gradient" not in ex["background"]]
  assert len(solid) > 100
  for ex in solid:
    packed = ex["image"].astype(np.int32) @ np.array([1 << 16, 1 << 8, 1])
    mode = np.bincount(packed.ravel()).argmax()  # The most frequent colour.
    bg = np.array([mode >> 16, (mode >> 8) & 255, mode & 255])
    fg = (ex["image"] != bg).any(-1)
    covered = np.zeros_like(fg)
    for obj in ex["objects"]:
      box = _pixel_box(obj)
      ys, xs, (oy, ox) = _region(box)
      np.testing.assert_array_equal(_tight_box(fg[ys, xs]) + [oy, ox, oy, ox], box)
      covered[ys, xs] = True
      # The shape is one flat colour whose hue is the named colour.
      colors = np.unique(ex["image"][ys, xs][fg[ys, xs]], axis=0)
      assert len(colors) == 1 and _hue_name(colors[0]) == obj["color"], (obj, colors)
    assert not (fg & ~covered).any(), "drawn pixels outside every object box"


def test_boxes_are_tight_boxes_of_saturated_pixels_on_every_background(scenes, saturated):
  for ex, sat in zip(scenes[:300], saturated):
    covered = np.zeros_like(sat)
    for obj in ex["objects"]:
      box = _pixel_box(obj)
      ys, xs, (oy, ox) = _region(box)
      np.testing.assert_array_equal(_tight_box(sat[ys, xs]) + [oy, ox, oy, ox], box)
      covered[ys, xs] = True
    # Backgrounds (gradients, noise) are grey-ish: never an object colour.
    background = ex["image"][~covered].astype(np.int16)
    assert np.ptp(background, axis=-1).max() <= 40, ex["background"]


def test_shape_pixel_footprints_match_their_kind(scenes, saturated):
  fills = collections.defaultdict(list)
  for ex, sat in zip(scenes, saturated):
    for obj in ex["objects"]:
      y0, x0, y1, x1 = _pixel_box(obj)
      m = sat[y0:y1, x0:x1]
      fills[obj["shape"]].append(m.mean())
      if obj["shape"] == "triangle":  # Points up: the bottom half holds most pixels.
        h = m.shape[0] // 2
        assert m[-h:].sum() > 2 * m[:h].sum()
  assert min(fills["square"]) > 0.95
  assert 0.74 < min(fills["circle"]) and max(fills["circle"]) < 0.9  # ~pi/4, pixelated.
  assert set(fills) == set(SHAPE_WORDS)


def test_small_and_large_objects_have_disjoint_pixel_extents(scenes):
  extent = collections.defaultdict(list)
  for ex in scenes:
    for obj in ex["objects"]:
      y0, x0, y1, x1 = _pixel_box(obj)
      extent[obj["size"]].append(max(y1 - y0, x1 - x0))
  assert max(extent["small"]) < min(extent["large"])
  assert len(set(extent["small"])) > 3 and len(set(extent["large"])) > 3  # Varied sizes.


# An independent reading of the referring expressions.
_RELATIVE = re.compile(r"the (.+?) (to the left of|left of|to the right of|right of|above|below)"
                       r" the (.+)")
_SUPERLATIVE_FIRST = re.compile(r"the (leftmost|rightmost|topmost|bottommost|left|right|top|bottom)"
                                r" (.+)")
_SUPERLATIVE_LAST = re.compile(r"the (.+) (?:on|at) the (left|right|top|bottom)")


def _matching(phrase, objects):
  words = phrase.split()
  assert words[-1] in SHAPE_WORDS and all(
      w in COLOR_HUES or w in SIZE_WORDS for w in words[:-1]), phrase
  return [i for i, o in enumerate(objects) if set(words) <= {o["color"], o["shape"], o["size"]}]


def _centre(obj):
  ymin, xmin, ymax, xmax = obj["bbox"]
  return np.array([(ymin + ymax) / 2, (xmin + xmax) / 2])


def _key(direction):
  """Maps a spatial word to (axis, sign): larger sign * coordinate = further that way."""
  direction = direction.replace("most", "")
  for words, key in ((("left",), (1, -1)), (("right",), (1, 1)), (("top", "above"), (0, -1)),
                     (("bottom", "below"), (0, 1))):
    if any(w in direction for w in words):
      return key
  raise AssertionError(direction)


def _reference_resolve(text, objects):
  """Returns (matching indices, spatial gap or None)."""
  pos = lambda i, key: key[1] * _centre(objects[i])[key[0]]
  if m := _RELATIVE.fullmatch(text):
    landmark = _matching(m.group(3), objects)
    assert len(landmark) == 1, text
    key = _key(m.group(2))
    cands = [i for i in _matching(m.group(1), objects) if i != landmark[0]]
    hits = [i for i in cands if pos(i, key) > pos(landmark[0], key)]
    return hits, min((pos(i, key) - pos(landmark[0], key) for i in hits), default=None)
  m = _SUPERLATIVE_FIRST.fullmatch(text)
  phrase, direction = (m.group(2), m.group(1)) if m else (None, None)
  if (m := _SUPERLATIVE_LAST.fullmatch(text)):
    phrase, direction = m.group(1), m.group(2)
  if phrase is not None:
    key = _key(direction)
    cands = sorted(_matching(phrase, objects), key=lambda i: -pos(i, key))
    gap = pos(cands[0], key) - pos(cands[1], key) if len(cands) > 1 else None
    return cands[:1], gap
  return _matching(text.removeprefix("the "), objects), None


@pytest.mark.parametrize("scenes_fixture", ["scenes", "color_scenes"])
def test_every_refexp_resolves_to_exactly_its_object_with_a_clear_margin(scenes_fixture, request):
  scenes = request.getfixturevalue(scenes_fixture)
  for ex in scenes:
    for t, obj in enumerate(ex["objects"]):
      hits, gap = _reference_resolve(obj["refexp"], ex["objects"])
      assert hits == [t], (obj["refexp"], ex["objects"])
      if gap is not None:
        assert gap > 0.1 - 1e-9, (obj["refexp"], gap)  # Clear enough to be unambiguous.
      assert obj["name"] == f"{obj['size']} {obj['color']} {obj['shape']}"


def test_module_resolver_agrees_with_the_reference(scenes):
  for ex in scenes[:100]:
    for t, obj in enumerate(ex["objects"]):
      ref = locca_shapes.parse_refexp(obj["refexp"])
      assert locca_shapes.resolve_refexp(ref, ex["objects"]) == [t]
  with pytest.raises(ValueError, match="expected a shape"):
    locca_shapes.parse_refexp("the red")


def test_benchmark_needs_positions(scenes):
  refexps = [o["refexp"] for ex in scenes for o in ex["objects"]]
  spatial = re.compile(r"\b(left|right|top|bottom|above|below|leftmost|rightmost|topmost|"
                       r"bottommost)\b")
  assert np.mean([bool(spatial.search(r)) for r in refexps]) >= 0.25
  assert np.mean([bool(_RELATIVE.fullmatch(r)) for r in refexps]) >= 0.03  # Two-object relations.
  repeated = [len({o["color"] for o in ex["objects"]}) < len(ex["objects"])
              or len({o["shape"] for o in ex["objects"]}) < len(ex["objects"]) for ex in scenes]
  twins = [len({o["name"] for o in ex["objects"]}) < len(ex["objects"]) for ex in scenes]
  assert np.mean(repeated) >= 0.6 and np.mean(twins) >= 0.3
  assert {len(ex["objects"]) for ex in scenes} == {2, 3, 4, 5}


_COUNT = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5}


@pytest.mark.parametrize("scenes_fixture", ["scenes", "color_scenes"])
def test_captions_count_every_object(scenes_fixture, request):
  scenes = request.getfixturevalue(scenes_fixture)
  pattern = re.compile(r"\b(a|an|two|three|four|five) (?:(small|large) )?(\w+) (\w+)(?=,| and|$| on)")
  singular = lambda w: next((s for s in (w, w[:-1], w[:-2]) if s in SHAPE_WORDS), None)
  for ex in scenes:
    truth = collections.Counter((o["color"], o["shape"]) for o in ex["objects"])
    sized = collections.Counter((o["size"], o["color"], o["shape"]) for o in ex["objects"])
    assert 1 <= len(ex["captions"]) <= 2
    saw_sizes = False
    for caption in ex["captions"]:
      assert caption == caption.lower() and ex["background"] in caption
      found, found_sized = collections.Counter(), collections.Counter()
      for count, size, color, shape in pattern.findall(caption):
        shape = singular(shape)
        if color in COLOR_HUES and shape:
          assert (shape + "s" if shape != "cross" else "crosses").endswith(
              "" if count in ("a", "an") else "s")
          found[(color, shape)] += _COUNT[count]
          found_sized[(size, color, shape)] += _COUNT[count]
      assert found == truth, (caption, ex["objects"])
      if all(size for size, _, _ in found_sized):
        saw_sizes = True
        assert found_sized == sized, caption
    assert saw_sizes


def test_scene_sets_object_count_shapes_and_backgrounds(color_scenes):
  assert {len(ex["objects"]) for ex in color_scenes} == {1, 2, 3}
  assert {o["shape"] for ex in color_scenes for o in ex["objects"]} == {"square"}
  for ex in color_scenes:
    assert "noisy" not in ex["background"] and "gradient" not in ex["background"]
    border = np.concatenate([ex["image"][0], ex["image"][-1], ex["image"][:, 0]])
    assert len(np.unique(border, axis=0)) == 1  # One solid background colour.
    assert not any("one shapes" in c or "1 shapes" in c for c in ex["captions"])
  assert any(c.startswith("one shape on ") for ex in color_scenes for c in ex["captions"])
  # Referents differ by colour, size or position only; some need a position.
  refexps = [o["refexp"] for ex in color_scenes for o in ex["objects"]]
  assert any(r.endswith(("left", "right", "top", "bottom")) or " of " in r for r in refexps)
  with pytest.raises(ValueError, match="min_objects"):
    locca_shapes.Scene(min_objects=0)
  with pytest.raises(ValueError, match="shapes"):
    locca_shapes.Scene(shapes=("hexagon",))


def test_same_index_is_identical_and_different_indices_differ():
  a = locca_shapes.generate_example(locca_shapes.split_rng("train", 7))
  b = locca_shapes.generate_example(np.random.default_rng([locca_shapes.SPLIT_SEEDS["train"], 7]))
  assert a["image"].dtype == np.uint8 and a["image"].shape == (S, S, 3)
  assert a["image"].tobytes() == b["image"].tobytes()
  assert a["captions"] == b["captions"] and a["objects"] == b["objects"]
  images = {ex["image"].tobytes() for ex in _scenes(50, "train")}
  images |= {ex["image"].tobytes() for ex in _scenes(50, "test")}
  assert len(images) == 100


def test_other_image_sizes_scale_boxes():
  ex = locca_shapes.generate_example(np.random.default_rng(0), image_size=224)
  assert ex["image"].shape == (224, 224, 3)
  for obj in ex["objects"]:
    box = np.asarray(obj["bbox"])
    assert 0 <= box.min() and box.max() <= 1 and (box[2:] > box[:2]).all()


def test_tiny_builder_prepares_offline_and_matches_the_generator(tmp_path):
  builder = tfds.builder("locca_shapes/tiny", data_dir=tmp_path)
  builder.download_and_prepare()
  sizes = {"train": 96, "validation": 32, "test": 32}
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == sizes
  ids = []
  for split, n in sizes.items():
    records = list(tfds.as_numpy(builder.as_dataset(split=split)))
    assert len(records) == n
    for rec in records[:8]:
      index = int(rec["image/id"]) - locca_shapes.ID_OFFSETS[split]
      ex = locca_shapes.generate_example(locca_shapes.split_rng(split, index), S)
      np.testing.assert_array_equal(rec["image"], ex["image"])  # PNG is lossless.
      np.testing.assert_allclose(rec["objects"]["bbox"], [o["bbox"] for o in ex["objects"]],
                                 atol=1e-6)
      assert [r.decode() for r in rec["objects"]["refexp"]] == [o["refexp"] for o in ex["objects"]]
      assert [r.decode() for r in rec["captions"]] == ex["captions"]
      colors = builder.info.features["objects"]["color"].int2str
      assert [colors(c) for c in rec["objects"]["color"]] == [o["color"] for o in ex["objects"]]
    ids += [int(rec["image/id"]) for rec in records]
  assert len(set(ids)) == len(ids) == sum(sizes.values())
  # `prepare` finds the prepared data and returns a usable builder.
  again = locca_shapes.prepare("tiny", data_dir=tmp_path)
  assert again.info.splits["validation"].num_examples == 32


def test_builder_config_scene_reaches_the_records(tmp_path):
  config = locca_shapes.LoccaShapesConfig(
      name="colors_test", split_sizes={"train": 24, "validation": 4, "test": 4},
      scene=locca_shapes.Scene(**COLOR_SCENE))
  builder = locca_shapes.LoccaShapes(config=config, data_dir=tmp_path)
  builder.download_and_prepare()
  shape_name = builder.info.features["objects"]["shape"].int2str
  records = list(tfds.as_numpy(builder.as_dataset(split="train")))
  assert {len(r["objects"]["shape"]) for r in records} <= {1, 2, 3}
  assert {shape_name(k) for r in records for k in r["objects"]["shape"]} == {"square"}
  named = {c.name for c in locca_shapes.LoccaShapes.BUILDER_CONFIGS}
  assert {"base", "tiny", "colors"} <= named
