"""Issue 5 diagnostic: what kind of mistake a `rec` evaluation's wrong boxes are.

Reads a `rec` evaluator's per-expression file (`WORKDIR/eval/rec_stepN.jsonl`) of a run on a
`locca_shapes` config, regenerates each image's objects (examples are a pure function of split
and index, `locca_shapes.split_rng`) and sorts every prediction, by the number of objects in
its image, into

  right            IoU >= 0.5 with the referent (what Acc@0.5 counts)
  other object     IoU >= 0.5 with another object: the wrong "which", a precise "where"
  overlaps target  0 < IoU < 0.5 with the referent, and no object matched
  overlaps other   no overlap with the referent, some with another object
  nowhere          overlaps no object

and prints the median absolute error per coordinate in pixels of the model's input size.

  PYTHONPATH=. .venv/bin/python docs/experiments/rec_errors.py WORKDIR/eval/rec_step3000.jsonl \
      [--config=colors] [--split=validation] [--image_size=64]

Results: docs/experiments/README.md, section 10.
"""
import argparse
import collections
import json

import numpy as np

from locca_jax import boxes as boxlib
from locca_jax.data import locca_shapes

KINDS = ("right", "other object", "overlaps target", "overlaps other", "nowhere")


def kind_of(pred_box, target, others):
  """One of KINDS for a predicted [ymin, xmin, ymax, xmax] box."""
  ious = boxlib.iou(np.asarray([pred_box]), np.asarray([target, *others]))[0]
  iou_target, best_other = float(ious[0]), float(ious[1:].max(initial=0.0))
  if iou_target >= 0.5:
    return "right"
  if best_other >= 0.5:
    return "other object"
  if iou_target > 0:
    return "overlaps target"
  return "overlaps other" if best_other > 0 else "nowhere"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("jsonl")
  p.add_argument("--config", default="colors",
                 choices=list(locca_shapes.LoccaShapes.builder_configs))
  p.add_argument("--split", default="validation")
  p.add_argument("--image_size", type=int, default=64)
  args = p.parse_args()
  scene = locca_shapes.LoccaShapes.builder_configs[args.config].scene
  counts = collections.defaultdict(collections.Counter)
  errors = []
  with open(args.jsonl) as f:
    rows = [json.loads(line) for line in f]
  for r in rows:
    index = r["image_id"] - locca_shapes.ID_OFFSETS[args.split]
    example = locca_shapes.generate_example(locca_shapes.split_rng(args.split, index),
                                            scene=scene)
    objects = [o["bbox"] for o in example["objects"]]
    target = r["object"]
    if not np.allclose(objects[target], r["gt_box"], atol=1e-6):
      raise ValueError(f"{args.jsonl}: image_id {r['image_id']} object {target}: regenerated "
                       f"box {objects[target]} != gt_box {r['gt_box']} (wrong --config/--split?)")
    if r["pred_box"] is None:
      kind = "nowhere"
    else:
      kind = kind_of(r["pred_box"], objects[target],
                     [b for k, b in enumerate(objects) if k != target])
      errors.append(np.abs(np.subtract(r["pred_box"], r["gt_box"])) * args.image_size)
    for key in (len(objects), "all"):
      counts[key][kind] += 1
  print(f"{args.jsonl}: {len(rows)} expressions")
  print("| objects in image | n | " + " | ".join(KINDS) + " |")
  print("|---|---|" + "---|" * len(KINDS))
  for key in sorted(counts, key=str):
    n = sum(counts[key].values())
    print(f"| {key} | {n} | " + " | ".join(f"{counts[key][k] / n:.2f}" for k in KINDS) + " |")
  med = np.median(np.stack(errors), axis=0)
  print("median |error| in px (ymin xmin ymax xmax):", np.round(med, 1).tolist())


if __name__ == "__main__":
  main()
