"""Data sources: each turns its records into the common example layout (see `common`).

A source is selected by one data spec (a dict, e.g. `config.input.data`):
  TFDS (default; `source="tfds"` optional):
    dict(name="coco/2017", split="train", data_dir=None, layout=None)
    name: any prepared TFDS dataset; "locca_shapes/<config>" is prepared on the fly. The layout
    (locca | coco | coco_captions | ref_coco) follows from the name; see `tfds_sources`.
    coco / coco_captions: drop_crowd (default True); coco_captions: objects (default True).
  Files parsed on the host (see `json_sources` for the formats):
    dict(source="jsonl", path="data/train.jsonl", image_dir=None, box_format="xyxy")
    dict(source="coco_json", path="instances.json", image_dir=None, captions_path=None)
    dict(source="vg", path="region_descriptions.json", image_dir=None, image_data=None)
Common optional keys: weight (mixtures), label (name in the metrics), exclude (default True:
apply config.input.exclude_image_ids), shuffle_buffer (this source's, default
config.input.shuffle_buffer), check_files (file sources: check on the host that image files
exist, default True), check_images (TFDS sources: check the stored image bytes in graph, default
False; file sources always do).

`config.input.data` is one spec, a list of specs or a dict {label: spec} (a weighted mixture).
"""
import os

from locca_jax.data.sources import common
from locca_jax.data.sources import json_sources
from locca_jax.data.sources import tfds_sources

KINDS = ("tfds",) + json_sources.SOURCES
_KNOWN_KEYS = {
    "source", "name", "split", "data_dir", "layout", "objects", "drop_crowd", "path",
    "image_dir", "box_format", "captions_path", "image_data", "check_files", "weight", "label",
    "exclude", "shuffle_buffer", "check_images"}


def as_dict(spec):
  """A data spec (dict or ConfigDict) as a plain dict."""
  return spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)


def _is_named_mixture(data):
  """A dict whose values are all data specs: {label: spec, ...}."""
  return (hasattr(data, "keys") and len(data.keys()) > 0 and
          all(hasattr(data[k], "keys") for k in data.keys()))


def specs_from_config(data):
  """config.input.data -> list of plain dict specs, validated.

  `data` is one spec, a list of specs, or a dict {label: spec} (a named mixture; with
  ml_collections its fields can be overridden on the command line, e.g.
  --config.input.data.coco.weight=0.5).
  """
  if _is_named_mixture(data):
    items = []
    for key in data.keys():
      spec = as_dict(data[key])
      spec.setdefault("label", key)
      items.append((f"config.input.data.{key}", spec))
  elif isinstance(data, (list, tuple)):
    items = [(f"config.input.data[{i}]", item) for i, item in enumerate(data)]
  else:
    items = [("config.input.data", data)]
  if not items:
    raise ValueError("config.input.data is empty (expected one data spec, a list of specs or "
                     "a dict {label: spec})")
  specs = []
  for where, item in items:
    if item is None or not hasattr(item, "keys"):
      raise ValueError(f"{where}: {item!r} (expected a dict such as dict(name='coco/2017', "
                       "split='train') or dict(source='jsonl', path=...))")
    spec = as_dict(item)
    unknown = set(spec) - _KNOWN_KEYS
    if unknown:
      raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_KNOWN_KEYS)})")
    kind = spec.setdefault("source", "tfds")
    if kind not in KINDS:
      raise ValueError(f"{where}.source={kind!r} unknown (expected one of {KINDS})")
    if kind == "tfds" and not (spec.get("name") and spec.get("split")):
      raise ValueError(f"{where}: a TFDS source needs name= and split=, got {spec}")
    if kind != "tfds" and not spec.get("path"):
      raise ValueError(f"{where}: source={kind!r} needs path=..., got {spec}")
    weight = spec.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
      raise ValueError(f"{where}.weight={weight!r} (expected a positive number)")
    specs.append(spec)
  labels = [label_of(s) for s in specs]
  for i, s in enumerate(specs):   # Unique metric names.
    if labels.count(labels[i]) > 1:
      s["label"] = f"{labels[i]}_{i}"
    else:
      s["label"] = labels[i]
  return specs


def label_of(spec):
  """The metrics name of a spec: `label`, else the TFDS name or the file's base name."""
  if spec.get("label"):
    return str(spec["label"])
  if spec.get("source", "tfds") == "tfds":
    return spec["name"].replace("/", "_")
  return os.path.splitext(os.path.basename(spec["path"]))[0]


def make_source(spec, *, process_index, process_count, exclude_ids=None, strict=False,
                passthrough=()):
  """A validated spec -> TfdsSource or JsonSource for this process."""
  if spec.get("source", "tfds") == "tfds":
    return tfds_sources.TfdsSource(spec, process_index=process_index,
                                   process_count=process_count, passthrough=passthrough,
                                   strict=strict)
  if passthrough:
    raise ValueError(f"extra_fields {list(passthrough)} are not fields of a {spec['source']} "
                     "source (available: image/id, record and the task outputs)")
  return json_sources.JsonSource(spec, process_index=process_index,
                                 process_count=process_count, exclude_ids=exclude_ids,
                                 strict=strict)


__all__ = ["common", "json_sources", "tfds_sources", "specs_from_config", "make_source",
           "as_dict", "KINDS"]
