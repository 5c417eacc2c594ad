"""`locca_shapes`: the built-in synthetic captioning / referring dataset, as a TFDS builder.

Each image holds 2-5 flat-coloured shapes on a neutral background (solid, gradient or light
noise). Every object has a tight box, a plain name ("small red triangle") and a referring
expression that picks it out uniquely ("the leftmost red triangle"); every image has two
captions. Colours and kinds repeat often and identical twins are common, so referring (ARef)
needs positions, not just attributes.

How hard a scene is, is a `Scene`: the number of objects, the shape kinds drawn, the
background kinds. The builder configs: `base` (the full benchmark), `tiny` (the same scenes,
for tests), `colors` (1-3 squares on solid backgrounds: referents differ by colour, size and
position only, never by shape, so an encoder that has not yet learned shapes can still refer;
the size for short runs).

  import locca_jax.data.locca_shapes  # registers the builder
  builder = tfds.builder("locca_shapes/tiny", data_dir=d); builder.download_and_prepare()

Example i of split s is `generate_example(np.random.default_rng([SPLIT_SEEDS[s], i]))`, with
`image/id = ID_OFFSETS[s] + i`. Boxes are normalized [ymin, xmin, ymax, xmax], max edges
exclusive (pixel edge / image size).
"""
import collections
import dataclasses
import functools

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_SIZE = 128
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES = ("small", "large")
SPLIT_SEEDS = {"train": 1_000, "validation": 2_000, "test": 3_000}
ID_OFFSETS = {"train": 0, "validation": 100_000_000, "test": 200_000_000}
# Spatial words need the centres to differ by this much (fraction of the image) for the
# target, and the distractors must not satisfy the relation at all, so any threshold in
# [0, RELATION_MARGIN] reads the same referent.
RELATION_MARGIN = 0.1

# Saturated object colours vs. unsaturated backgrounds: never confusable.
_RGB = {
    "red": (215, 35, 35), "green": (35, 160, 60), "blue": (40, 80, 215),
    "yellow": (235, 205, 30), "purple": (135, 55, 175), "orange": (240, 135, 25),
}
_BACKGROUNDS = {
    "white": (245, 245, 245), "light gray": (200, 200, 200), "gray": (128, 128, 128),
    "dark gray": (70, 70, 70), "black": (15, 15, 15), "beige": (225, 215, 190),
}
# Shape extent d as a fraction of the image size; the gap keeps "small" and "large" apart.
_SIZE_RANGE = {"small": (0.10, 0.16), "large": (0.22, 0.30)}
_GAP = 0.04           # minimum empty space between two object boxes (fraction of image)
_BORDER = 2           # pixels kept free at the image border
# Composition: a new object copies an earlier one's (colour, kind, size) / colour / kind.
_P_TWIN, _P_SAME_COLOR, _P_SAME_SHAPE = 0.25, 0.2, 0.2
_P_RELATIVE = 0.5     # when both work, how often "X left of Y" beats "the leftmost X"

_DIRECTIONS = ("left", "right", "top", "bottom")
_AXIS_SIGN = {"left": (1, -1.0), "right": (1, 1.0), "top": (0, -1.0), "bottom": (0, 1.0)}
_EXTREME_TEMPLATES = {
    "left": ("the leftmost {}", "the {} on the left", "the left {}"),
    "right": ("the rightmost {}", "the {} on the right", "the right {}"),
    "top": ("the topmost {}", "the {} at the top", "the top {}"),
    "bottom": ("the bottommost {}", "the {} at the bottom", "the bottom {}"),
}
_RELATIVE_PHRASES = {
    "left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
    "top": ("above",), "bottom": ("below",),
}
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
_CAPTION_TEMPLATES = (
    "{objs} on {bg}", "{bg} with {objs}", "{n} on {bg}: {objs}", "an image of {objs} on {bg}",
)
BACKGROUND_KINDS = ("solid", "gradient", "noise")


@dataclasses.dataclass(frozen=True)
class Scene:
  """What a scene holds: its difficulty. The defaults are the `base` benchmark.

  Objects per image are drawn uniformly from [min_objects, max_objects]; shape kinds uniformly
  from `shapes`; background kinds uniformly from `backgrounds` (repeat a kind to weight it).
  """
  min_objects: int = 2
  max_objects: int = 5
  shapes: tuple[str, ...] = SHAPES
  backgrounds: tuple[str, ...] = ("solid", "solid", "gradient", "noise")

  def __post_init__(self):
    if not 1 <= self.min_objects <= self.max_objects <= 5:
      raise ValueError(f"Scene objects [{self.min_objects}, {self.max_objects}]: expected "
                       "1 <= min_objects <= max_objects <= 5")
    for name, values, allowed in (("shapes", self.shapes, SHAPES),
                                  ("backgrounds", self.backgrounds, BACKGROUND_KINDS)):
      if not values or set(values) - set(allowed):
        raise ValueError(f"Scene {name} {values!r}: expected a non-empty tuple of {allowed}")


# ----------------------------------------------------------------------------- drawing

def _polygon_mask(yy, xx, vy, vx):
  """Even-odd point-in-polygon test of pixel centres against vertices (vy, vx)."""
  inside = np.zeros(np.broadcast(yy, xx).shape, bool)
  for k in range(len(vy)):
    y1, x1, y2, x2 = vy[k], vx[k], vy[k - 1], vx[k - 1]
    if y1 == y2:
      continue  # A horizontal edge never crosses a horizontal ray.
    crosses = (y1 > yy) != (y2 > yy)
    inside ^= crosses & (xx < x1 + (yy - y1) * (x2 - x1) / (y2 - y1))
  return inside


@functools.lru_cache(maxsize=4096)
def _shape_mask(shape, d):
  """Read-only mask of `shape` with extent ~d pixels, cropped to its tight box.

  A pixel is in when more than half of its 4x4 sub-samples are: no one-pixel nubs on circles.
  """
  n, ss = int(np.ceil(d)) + 3, 4
  c = n / 2
  yy = ((np.arange(n * ss) + 0.5) / ss)[:, None]  # Sub-sample centres, in pixels.
  xx = yy.T
  r = d / 2
  if shape == "circle":
    mask = (yy - c) ** 2 + (xx - c) ** 2 <= r * r
  elif shape == "square":
    mask = (np.abs(yy - c) <= r) & (np.abs(xx - c) <= r)
  elif shape == "triangle":  # Pointing up, height 0.9 d.
    h = 0.9 * d
    mask = _polygon_mask(yy, xx, (c - h / 2, c + h / 2, c + h / 2), (c, c + r, c - r))
  elif shape == "diamond":  # Taller than wide, so it never reads as a rotated square.
    mask = np.abs(xx - c) / (0.8 * r) + np.abs(yy - c) / r <= 1
  elif shape == "cross":
    t = 0.18 * d
    mask = ((np.abs(xx - c) <= t) & (np.abs(yy - c) <= r)) | (
        (np.abs(yy - c) <= t) & (np.abs(xx - c) <= r))
  elif shape == "star":  # Five points, inner radius half the outer one.
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, 0.5 * r)
    mask = _polygon_mask(yy, xx, c + 0.1 * r + radii * np.sin(angles), c + radii * np.cos(angles))
  else:
    raise ValueError(f"unknown shape {shape!r} (expected one of {SHAPES})")
  mask = mask.reshape(n, ss, n, ss).mean((1, 3)) > 0.5
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  mask = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
  mask.flags.writeable = False  # Shared through the cache.
  return mask


def _background(rng, s, kinds=Scene.backgrounds):
  """Returns (uint8 image [s, s, 3], caption phrase such as "a gray background")."""
  kind = rng.choice(kinds)
  names = list(_BACKGROUNDS)
  name = names[rng.integers(len(names))]
  base = np.array(_BACKGROUNDS[name], np.float32)
  if kind == "solid":
    img = np.empty((s, s, 3), np.uint8)
    img[...] = base.astype(np.uint8)
    return img, f"a {name} background"
  if kind == "noise":
    noise = rng.integers(-12, 13, size=(s, s, 1), dtype=np.int16)
    img = np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return img, f"a noisy {name} background"
  other = [n for n in names if n != name][rng.integers(len(names) - 1)]
  angle = rng.uniform(0, 2 * np.pi)
  yy, xx = np.ogrid[:s, :s]
  t = np.float32(np.cos(angle)) * xx + np.float32(np.sin(angle)) * yy
  t = ((t - t.min()) / (t.max() - t.min()))[..., None]
  img = base + (np.array(_BACKGROUNDS[other], np.float32) - base) * t
  return img.round().astype(np.uint8), f"a {name} to {other} gradient background"


def _sample_attributes(rng, scene):
  """(size, color, shape) triples, one per object; repeats are frequent by design."""
  rand = lambda options: options[rng.integers(len(options))]
  attrs = []
  for k in range(rng.integers(scene.min_objects, scene.max_objects + 1)):
    u = rng.random()
    if k and u < _P_TWIN:
      attrs.append(attrs[rng.integers(k)])
    elif k and u < _P_TWIN + _P_SAME_COLOR:
      attrs.append((rand(SIZES), attrs[rng.integers(k)][1], rand(scene.shapes)))
    elif k and u < _P_TWIN + _P_SAME_COLOR + _P_SAME_SHAPE:
      attrs.append((rand(SIZES), rand(COLORS), attrs[rng.integers(k)][2]))
    else:
      attrs.append((rand(SIZES), rand(COLORS), rand(scene.shapes)))
  return attrs


def _place(rng, masks, s, tries=60):
  """Non-overlapping top-left corners for the masks (largest first), or None."""
  gap = max(2, round(_GAP * s))
  placed = {}
  for k in sorted(range(len(masks)), key=lambda k: -masks[k].size):
    h, w = masks[k].shape
    for _ in range(tries):
      y0 = int(rng.integers(_BORDER, s - _BORDER - h + 1))
      x0 = int(rng.integers(_BORDER, s - _BORDER - w + 1))
      if all(y0 >= b[2] + gap or b[0] >= y0 + h + gap or x0 >= b[3] + gap or b[1] >= x0 + w + gap
             for b in placed.values()):
        placed[k] = (y0, x0, y0 + h, x0 + w)
        break
    else:
      return None
  return [placed[k] for k in range(len(masks))]


# ----------------------------------------------------------------------------- referring

def _centre(obj):
  ymin, xmin, ymax, xmax = obj["bbox"]
  return ((ymin + ymax) / 2, (xmin + xmax) / 2)


def _positions(objects):
  """direction -> per-object centre coordinate, larger = further in that direction."""
  centres = [_centre(o) for o in objects]
  return {d: [sign * c[axis] for c in centres] for d, (axis, sign) in _AXIS_SIGN.items()}


def resolve_refexp(ref, objects, margin=RELATION_MARGIN):
  """Indices of `objects` that the parsed refexp `ref` (see `parse_refexp`) describes.

  Attributes left as None match anything. "extreme": the candidate further in `direction`
  than every other candidate by more than `margin`. "relative": candidates further in
  `direction` than the (uniquely resolved) landmark by more than `margin`, on box centres.
  """
  return _resolve(ref, objects, _positions(objects), margin)


def _resolve(ref, objects, positions, margin):
  size, color, shape = ref["size"], ref["color"], ref["shape"]
  cands = [i for i, o in enumerate(objects) if o["shape"] == shape
           and (color is None or o["color"] == color) and (size is None or o["size"] == size)]
  relation = ref["relation"]
  if relation is None:
    return cands
  pos = positions[ref["direction"]]
  if relation == "extreme":
    return [i for i in cands if all(pos[i] > pos[j] + margin for j in cands if j != i)]
  if relation == "relative":
    landmark = _resolve(ref["landmark"], objects, positions, margin)
    if len(landmark) != 1:
      return []
    lm = landmark[0]
    return [i for i in cands if i != lm and pos[i] > pos[lm] + margin]
  raise ValueError(f"unknown relation {relation!r} (expected None, extreme, relative)")


def _parse_simple(words, text):
  if not words or words[-1] not in SHAPES:
    raise ValueError(f"refexp {text!r}: expected a shape ({', '.join(SHAPES)}) as last word")
  ref = dict(size=None, color=None, shape=words[-1], relation=None, direction=None,
             landmark=None)
  rest = words[:-1]
  if rest and rest[-1] in COLORS:
    ref["color"] = rest.pop()
  if rest and rest[-1] in SIZES:
    ref["size"] = rest.pop()
  if rest:
    raise ValueError(f"refexp {text!r}: unexpected words {rest} (expected [size] [color] shape)")
  return ref


def parse_refexp(text):
  """Parses a refexp made by `generate_example` into a dict for `resolve_refexp`."""
  for direction, phrases in _RELATIVE_PHRASES.items():
    for phrase in sorted(phrases, key=len, reverse=True):
      head, sep, tail = text.partition(f" {phrase} ")
      if sep:
        ref = parse_refexp(head)
        if ref["relation"] is not None:
          raise ValueError(f"refexp {text!r}: only one spatial relation is supported")
        landmark = parse_refexp(tail)
        if landmark["relation"] is not None:
          raise ValueError(f"refexp {text!r}: the landmark must not have a relation")
        return dict(ref, relation="relative", direction=direction, landmark=landmark)
  words = text.split()
  if not words or words[0] != "the":
    raise ValueError(f"refexp {text!r}: expected it to start with 'the'")
  words = words[1:]
  for direction in _DIRECTIONS:
    superlative = {"top": "topmost", "bottom": "bottommost"}.get(direction, direction + "most")
    suffix = ["on" if direction in ("left", "right") else "at", "the", direction]
    if words and words[0] in (superlative, direction):
      body = words[1:]
    elif words[-3:] == suffix:
      body = words[:-3]
    else:
      continue
    return dict(_parse_simple(body, text), relation="extreme", direction=direction)
  return _parse_simple(words, text)


def _simple_ref(obj, keys):
  ref = dict(size=None, color=None, shape=obj["shape"], relation=None, direction=None,
             landmark=None)
  ref.update({k: obj[k] for k in keys})
  return ref


def _base_text(ref):
  return " ".join(ref[k] for k in ("size", "color", "shape") if ref[k])


def _render(ref, rng):
  base = _base_text(ref)
  if ref["relation"] is None:
    return f"the {base}"
  if ref["relation"] == "extreme":
    templates = _EXTREME_TEMPLATES[ref["direction"]]
    return templates[rng.integers(len(templates))].format(base)
  phrases = _RELATIVE_PHRASES[ref["direction"]]
  return f"the {base} {phrases[rng.integers(len(phrases))]} {_render(ref['landmark'], rng)}"


def _words(ref):
  n = len(_base_text(ref).split())
  if ref["relation"] == "extreme":
    return n + 1
  if ref["relation"] == "relative":
    return n + 1 + _words(ref["landmark"])
  return n


_BASE_KEYS = ((), ("color",), ("size",), ("size", "color"))


def _shortest(refs, rng):
  words = [_words(r) for r in refs]
  ties = [r for r, w in zip(refs, words) if w == min(words)]
  return ties[rng.integers(len(ties))]


def _refexps(objects, rng):
  """A uniquely resolving refexp per object, or None when some object has none."""
  n = len(objects)
  positions = _positions(objects)
  # Unique at the clear margin and at zero margin, hence at every threshold in between.
  unique = lambda ref, t: (_resolve(ref, objects, positions, RELATION_MARGIN) == [t]
                           and _resolve(ref, objects, positions, 0.0) == [t])
  simple = []
  for t in range(n):
    refs = [_simple_ref(objects[t], keys) for keys in _BASE_KEYS]
    simple.append([r for r in refs if unique(r, t)])
  out = []
  for t in range(n):
    ref = _shortest(simple[t], rng) if simple[t] else None
    if ref is None:
      bases = [_simple_ref(objects[t], keys) for keys in _BASE_KEYS]
      extremes = [r for r in (dict(b, relation="extreme", direction=d)
                              for b in bases for d in _DIRECTIONS) if unique(r, t)]
      if extremes and rng.random() >= _P_RELATIVE:
        ref = _shortest(extremes, rng)
      else:
        landmarks = [_shortest(simple[l], rng) for l in range(n) if l != t and simple[l]]
        relatives = [r for r in (dict(b, relation="relative", direction=d, landmark=lm)
                                 for b in bases for d in _DIRECTIONS for lm in landmarks)
                     if unique(r, t)]
        if relatives or extremes:
          ref = _shortest(relatives or extremes, rng)
        else:
          return None
    text = _render(ref, rng)
    # Check the words, not only the structure: the text must resolve to this object alone.
    if not unique(parse_refexp(text), t):
      raise AssertionError(f"refexp {text!r} does not resolve to object {t}: {objects}")
    out.append(text)
  return out


# ----------------------------------------------------------------------------- captions

def _noun_phrase(count, words):
  if count == 1:
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
  plural = words[-1] + ("es" if words[-1].endswith("s") else "s")
  return " ".join((_NUMBER_WORDS[count], *words[:-1], plural))


def _join(items):
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _captions(objects, background, rng):
  """Two captions in different templates; one names sizes, one does not."""
  left_to_right = sorted(objects, key=lambda o: _centre(o)[1])
  first, second = rng.permutation(len(_CAPTION_TEMPLATES))[:2]
  captions = []
  for template, keys in ((first, ("size", "color", "shape")), (second, ("color", "shape"))):
    groups = collections.Counter(tuple(o[k] for k in keys) for o in left_to_right)
    objs = _join([_noun_phrase(c, list(g)) for g, c in groups.items()])
    n = _NUMBER_WORDS[len(objects)] + (" shape" if len(objects) == 1 else " shapes")
    text = _CAPTION_TEMPLATES[template].format(objs=objs, bg=background, n=n)
    captions.append(text)
  return captions


# ----------------------------------------------------------------------------- scenes

def generate_example(rng: np.random.Generator, image_size: int = IMAGE_SIZE,
                     scene: Scene = Scene()) -> dict:
  """One scene: image uint8 [S, S, 3], captions, objects (bbox, refexp, name, attributes).

  Also returns "background", the caption phrase for it (e.g. "a noisy gray background").
  Scenes where some object cannot be referred to uniquely are resampled.
  """
  s = image_size
  if s < 64:
    raise ValueError(f"image_size {s} is too small for 5 separable shapes (expected >= 64)")
  while True:
    attrs = _sample_attributes(rng, scene)
    masks = []
    for size, _, shape in attrs:
      lo, hi = _SIZE_RANGE[size]
      # Quarter-pixel steps: sizes still vary continuously to the eye, masks get cached.
      masks.append(_shape_mask(shape, round(rng.uniform(lo, hi) * s * 4) / 4))
    boxes = _place(rng, masks, s)
    if boxes is None:
      continue
    objects = [dict(bbox=[b[0] / s, b[1] / s, b[2] / s, b[3] / s], size=size, color=color,
                    shape=shape, name=f"{size} {color} {shape}")
               for (size, color, shape), b in zip(attrs, boxes)]
    refexps = _refexps(objects, rng)
    if refexps is not None:
      break
  image, background = _background(rng, s, scene.backgrounds)
  for (_, color, _), mask, (y0, x0, y1, x1) in zip(attrs, masks, boxes):
    image[y0:y1, x0:x1][mask] = _RGB[color]
  for obj, refexp in zip(objects, refexps):
    obj["refexp"] = refexp
  return dict(image=image, captions=_captions(objects, background, rng),
              objects=objects, background=background)


def split_rng(split: str, index: int) -> np.random.Generator:
  """The generator of example `index` of `split`: independent of every other example."""
  if split not in SPLIT_SEEDS:
    raise ValueError(f"unknown split {split!r} (expected one of {list(SPLIT_SEEDS)})")
  return np.random.default_rng([SPLIT_SEEDS[split], index])


# ----------------------------------------------------------------------------- TFDS

@dataclasses.dataclass(eq=False)
class LoccaShapesConfig(tfds.core.BuilderConfig):
  """Number of examples per split and what the scenes hold."""
  split_sizes: dict = dataclasses.field(
      default_factory=lambda: {"train": 20_000, "validation": 1_000, "test": 1_000})
  scene: Scene = dataclasses.field(default_factory=Scene)


class LoccaShapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes with captions, boxes and unique referring expressions; no download."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      LoccaShapesConfig(name="base", description="20k train / 1k validation / 1k test.",
                        split_sizes={"train": 20_000, "validation": 1_000, "test": 1_000}),
      LoccaShapesConfig(name="tiny", description="96 train / 32 validation / 32 test, for tests.",
                        split_sizes={"train": 96, "validation": 32, "test": 32}),
      LoccaShapesConfig(name="colors", description="1-3 squares on solid backgrounds, referred "
                        "to by colour, size and position; 20k train / 1k validation / 1k test.",
                        split_sizes={"train": 20_000, "validation": 1_000, "test": 1_000},
                        scene=Scene(min_objects=1, max_objects=3, shapes=("square",),
                                    backgrounds=("solid",))),
  ]
  DEFAULT_CONFIG_NAME = "base"

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                         encoding_format="png"),
            "image/id": tf.int64,
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "refexp": tfds.features.Text(),
                "name": tfds.features.Text(),
                "color": tfds.features.ClassLabel(names=COLORS),
                "shape": tfds.features.ClassLabel(names=SHAPES),
                "size": tfds.features.ClassLabel(names=SIZES),
            }),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is generated; nothing to download.
    return {split: self._generate_examples(split, n)
            for split, n in self.builder_config.split_sizes.items()}

  def _generate_examples(self, split, num_examples):
    keys = ("refexp", "name", "color", "shape", "size")
    for i in range(num_examples):
      ex = generate_example(split_rng(split, i), IMAGE_SIZE, self.builder_config.scene)
      objects = {k: [o[k] for o in ex["objects"]] for k in keys}
      objects["bbox"] = [np.asarray(o["bbox"], np.float64) for o in ex["objects"]]
      yield i, {
          "image": ex["image"],
          "image/id": ID_OFFSETS[split] + i,
          "captions": ex["captions"],
          "objects": objects,
      }


def prepare(config_name: str = "base", data_dir=None):
  """Returns the `locca_shapes/<config_name>` builder, generating the data if not there yet."""
  builder = LoccaShapes(config=config_name, data_dir=data_dir)
  builder.download_and_prepare()
  return builder
