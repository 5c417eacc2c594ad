"""LocCa-B/16 on your own data: images with captions and detector pseudo-boxes (JSONL), mixed
with box annotations (COCO-JSON) and Visual Genome region descriptions; the images of RefCOCO's
val/test splits are left out of training. Formats: README "Custom data".

Run:   python -m locca_jax.train --config=configs/locca_custom.py --workdir=W
Tiny:  --config=configs/locca_custom.py:runlocal   (same data, small model; for a first check)
Point DATA at your files (local paths or gs://...); relative image paths in a file are resolved
against that file's directory (or image_dir).
"""
import ml_collections

from configs import locca_b16

DATA = "data/custom"


def get_config(arg=None):
  c = locca_b16.get_config(arg)
  # A named mixture {label: source}; override on the command line, e.g.
  # --config.input.data.pseudo.path=gs://bucket/train.jsonl --config.input.data.vg.weight=0.2
  c.input.data = ml_collections.ConfigDict(dict(
      # One line per image: {"image", "caption", "regions": [{"box", "text", "score"}]}.
      pseudo=dict(source="jsonl", path=f"{DATA}/pseudo_boxes.jsonl", image_dir="",
                  weight=0.7),
      # COCO instances layout; category names become region texts; + COCO captions.
      coco=dict(source="coco_json", path=f"{DATA}/coco/instances_train2017.json",
                image_dir=f"{DATA}/coco/train2017",
                captions_path=f"{DATA}/coco/captions_train2017.json", weight=0.2),
      # Visual Genome region descriptions (+ image_data.json: sizes and COCO ids).
      vg=dict(source="vg", path=f"{DATA}/vg/region_descriptions.json", image_dir=f"{DATA}/vg",
              image_data=f"{DATA}/vg/image_data.json", weight=0.1),
  ))
  c.input.min_box_score = 0.3       # pseudo-boxes below this detector score are dropped
  c.input.max_text_len = 512        # characters; longer captions / region texts are dropped
  c.input.box_tolerance = 0.01      # boxes this far outside the image are clipped, not dropped
  c.input.strict = False            # True: the first bad record raises (file, line, field)
  # COCO image ids to leave out (RefCOCO/+/g val + test images): a JSON list, a JSON object
  # {"image_ids": [...]} or one id per line.
  c.input.exclude_image_ids = f"{DATA}/refcoco_val_test_coco_ids.json"
  c.input.count_excluded = False    # TFDS sources only: exact count with one pass at start-up
  return c
