"""Smoke test of the input throughput benchmark at a tiny size (no timing claims here; the
numbers live in docs/PERFORMANCE.md)."""
import numpy as np
import tensorflow_datasets as tfds

from locca_jax.data import bench_input


def test_bench_input_writes_a_readable_dataset_and_times_every_stage(tmp_path):
  result = bench_input.run(num=16, image_size=64, batch=8, shuffle_buffer=4, repeats=1,
                           workdir=str(tmp_path))
  assert list(result["rows"]) == list(bench_input.STAGES)
  assert all(np.isfinite(v) and v > 0 for v in result["rows"].values())
  assert result["ratio"]["decode+resize"] == 1.0
  assert result["mean_jpeg_bytes"] > 0
  table = bench_input.format_table(result)
  assert all(stage in table for stage in bench_input.STAGES)
  # The written TFRecords hold what the pipeline reads: JPEG images, captions, boxes.
  (data_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
  builder = tfds.builder(bench_input.DATASET, data_dir=str(data_dir))
  assert builder.info.splits["train"].num_examples == 16
  ex = next(iter(builder.as_dataset(split="train", decoders={
      "image": tfds.decode.SkipDecoding()}).as_numpy_iterator()))
  assert ex["image"][:3] == b"\xff\xd8\xff"   # JPEG
  assert len(ex["captions"]) == 2 and ex["objects"]["bbox"].shape[1] == 4
