r"""Input-pipeline throughput on ONE CPU core: raw JPEG decode + resize vs the full pipeline.

  python -m locca_jax.data.bench_input --num=2000

Writes `--num` synthetic locca_shapes scenes (`locca_shapes.generate_example` at
`--image_size`, default 224 px; `--noise` adds Gaussian pixel noise of that standard deviation,
which makes the JPEGs closer to photos in size and decode cost) as JPEG (quality `--quality`)
TFRecords in the TFDS layout (`tfds.dataset_builders.store_as_tfds_dataset`, in `--workdir` or a
temporary directory) with their captions, boxes and referring expressions. Then it times one
pass over the `num` images, each stage on a fresh iterator, the first batch excluded, best of
`--repeats`:

  decode+resize       tf.io.decode_jpeg + tf.image.resize (antialias, to image_size squared,
                      float32) of the JPEG bytes held in memory, batched: the reference
  read+decode+resize  the same, reading the TFRecords
  pipeline, no shuffle  input_pipeline.make_train_dataset as the trainer uses it (read, check
                      and count, decode, resize, uint8 pixels, task draws, batch, tokenize,
                      Cap/ARef/GCap rows), with shuffle_buffer=0
  pipeline            the same with `--shuffle_buffer` (default 1000)
  pipeline+crop       the same with config.input.crop = dict(kind="inception")

One core: `main` pins the whole process (every thread) to one CPU with `os.sched_setaffinity`
(what `taskset -c N` does; `--cpu`, default the last CPU this process may use), sets TF's
inter- and intra-op thread pools to 1 thread, and every pipeline gets
`tf.data.Options().threading.private_threadpool_size = 1` and `max_intra_op_parallelism = 1`.
`AUTOTUNE` parallelism inside the pipeline therefore has one thread to work with.

The stages are timed round robin, `--repeats` rounds, best round per stage. Prints a table
(images/s and ratio to decode+resize) and a JSON line. Results: docs/PERFORMANCE.md.
"""
import io
import json
import os
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags
import ml_collections
import numpy as np

STAGES = ("decode+resize", "read+decode+resize", "pipeline, no shuffle", "pipeline",
          "pipeline+crop")
DATASET = "locca_input_bench"


def pin_to_one_cpu(cpu=None):
  """Pins every thread of this process to one CPU (as `taskset -c cpu`); returns the CPU."""
  allowed = sorted(os.sched_getaffinity(0))
  cpu = allowed[-1] if cpu is None else int(cpu)
  if cpu not in allowed:
    raise ValueError(f"--cpu={cpu} is not one of the CPUs this process may use ({allowed})")
  for tid in os.listdir("/proc/self/task"):
    try:
      os.sched_setaffinity(int(tid), {cpu})
    except ProcessLookupError:   # A thread that just ended.
      pass
  return cpu


def write_dataset(data_dir, num, image_size, quality=90, noise=0.0):
  """Writes `num` JPEG scenes as a TFDS dataset in `data_dir` (kept if already there); returns
  its name.

  The dataset has locca_shapes' layout (image, image/id, captions, objects {bbox, refexp}), so
  the pipeline reads it as `dict(name=name, split="train", data_dir=data_dir)`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from locca_jax.data import locca_shapes  # pylint: disable=g-import-not-at-top

  if tf.io.gfile.exists(os.path.join(data_dir, DATASET, "1.0.0", "dataset_info.json")):
    return DATASET
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(image_size, image_size, 3), encoding_format="jpeg"),
      "image/id": tf.int64,
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "objects": tfds.features.Sequence({"bbox": tfds.features.BBoxFeature(),
                                         "refexp": tfds.features.Text()}),
  })
  def examples():
    for i in range(num):
      rng = np.random.default_rng([7, i])
      ex = locca_shapes.generate_example(rng, image_size)
      image = ex["image"]
      if noise:
        image = np.clip(image + rng.normal(0.0, noise, image.shape), 0, 255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, format="JPEG", quality=quality)
      yield i, {"image": io.BytesIO(buf.getvalue()), "image/id": i, "captions": ex["captions"],
                "objects": {"bbox": [np.asarray(o["bbox"], np.float32) for o in ex["objects"]],
                            "refexp": [o["refexp"] for o in ex["objects"]]}}

  tfds.dataset_builders.store_as_tfds_dataset(
      DATASET, "1.0.0", features, {"train": examples()}, data_dir=data_dir,
      disable_shuffling=True)
  return DATASET


def bench_config(data_dir, name, *, image_size, batch, shuffle_buffer, crop=None,
                 shuffle_block=1):
  """The training input config timed as "pipeline" (the locca_b16 input recipe at this size,
  with the locca_shapes SentencePiece model)."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      input=dict(
          data=dict(name=name, split="train", data_dir=data_dir), batch_size=batch,
          image_size=image_size, resize="squash", crop=crop, seq_len=64,
          tasks=("cap", "aref", "gcap"), prefixes=dict(cap="cap:", aref="aref:", gcap="gcap:"),
          shuffle_buffer=shuffle_buffer, shuffle_block=shuffle_block,
          tokenizer=dict(sp_model="locca_jax/assets/locca_shapes_sp.model", box_codec="text",
                         bins=500, box_order="xmin ymin xmax ymax"))))


def _one_thread(ds):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def _time(make_dataset, num_batches, batch, repeats):
  """Best images/s over `repeats` fresh iterators, each timing `num_batches` batches after a
  first (excluded: start-up, shuffle buffer filling) one."""
  best = 0.0
  for _ in range(repeats):
    it = make_dataset().as_numpy_iterator()
    next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
      next(it)
    best = max(best, num_batches * batch / (time.perf_counter() - start))
  return best


def run(*, num, image_size=224, batch=64, quality=90, noise=0.0, shuffle_buffer=1000,
        shuffle_block=1, repeats=3, workdir=None):
  """Writes the data and times every stage. Returns dict(rows={stage: images/s}, ratio, ...)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from locca_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  if num < 2 * batch:
    raise ValueError(f"--num={num}: expected at least 2 batches of --batch={batch}")
  if workdir is None:
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
      return run(num=num, image_size=image_size, batch=batch, quality=quality, noise=noise,
                 shuffle_buffer=shuffle_buffer, shuffle_block=shuffle_block,
                 repeats=repeats, workdir=tmp)
  data_dir = os.path.join(workdir, f"{num}x{image_size}px_q{quality}_noise{noise:g}")
  name = write_dataset(data_dir, num, image_size, quality, noise)
  builder = tfds.builder(name, data_dir=data_dir)
  read = lambda: builder.as_dataset(split="train", shuffle_files=False,
                                    decoders={"image": tfds.decode.SkipDecoding()})
  jpegs = [ex["image"] for ex in read().as_numpy_iterator()]
  if len(jpegs) != num:
    raise ValueError(f"{data_dir}: expected {num} examples of {name}, read {len(jpegs)}")
  jpeg_bytes = float(np.mean([len(j) for j in jpegs]))
  encoded = tf.constant(jpegs)

  def decode_resize(data):
    image = tf.io.decode_jpeg(data, channels=3)
    return tf.image.resize(image, [image_size, image_size], antialias=True)

  tok = input_pipeline.make_tokenizer(
      bench_config(data_dir, name, image_size=image_size, batch=batch,
                   shuffle_buffer=0).input.tokenizer)

  def pipeline(crop, shuffle):
    config = bench_config(data_dir, name, image_size=image_size, batch=batch,
                          shuffle_buffer=shuffle, crop=crop,
                          shuffle_block=shuffle_block if shuffle else 1)
    return input_pipeline.make_train_dataset(config, tok, process_index=0, process_count=1,
                                             with_counters=True)

  makers = {
      "decode+resize": lambda: tf.data.Dataset.from_tensor_slices(encoded).repeat().map(
          decode_resize, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(1),
      "read+decode+resize": lambda: read().repeat().map(
          lambda ex: decode_resize(ex["image"]),
          num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(1),
      "pipeline, no shuffle": lambda: pipeline(None, 0),
      "pipeline": lambda: pipeline(None, shuffle_buffer),
      "pipeline+crop": lambda: pipeline(dict(kind="inception"), shuffle_buffer),
  }
  num_batches = num // batch
  rows = {stage: 0.0 for stage in STAGES}
  for _ in range(repeats):   # Round robin: slow phases of a shared machine hit every stage.
    for stage in STAGES:
      rows[stage] = max(rows[stage], _time(lambda m=makers[stage]: _one_thread(m()),
                                           num_batches, batch, 1))
  return dict(rows=rows, ratio={k: v / rows["decode+resize"] for k, v in rows.items()},
              num=num, image_size=image_size, batch=batch, quality=quality, noise=noise,
              mean_jpeg_bytes=jpeg_bytes, shuffle_buffer=shuffle_buffer,
              shuffle_block=shuffle_block, repeats=repeats)


def machine():
  """CPU model, CPU count, Python / TensorFlow / TFDS versions."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return dict(cpu=model, cpus=os.cpu_count(), python=platform.python_version(),
              tensorflow=tf.__version__, tensorflow_datasets=tfds.__version__)


def format_table(result):
  lines = ["| stage | images/s (1 core) | ratio to decode+resize |", "|---|---|---|"]
  for stage in STAGES:
    lines.append(f"| {stage} | {result['rows'][stage]:.0f} | {result['ratio'][stage]:.2f} |")
  return "\n".join(lines)


def _define_flags():
  """The command's flags, defined only when run as a program: importing this module (the
  tests do, beside the trainer's --workdir) defines none."""
  return dict(
      num=flags.DEFINE_integer("num", 2000, "Images to write and to time per stage."),
      image_size=flags.DEFINE_integer("image_size", 224,
                                      "Image size (written and model input)."),
      batch=flags.DEFINE_integer("batch", 64, "Batch size of every stage."),
      quality=flags.DEFINE_integer("quality", 90, "JPEG quality."),
      noise=flags.DEFINE_float("noise", 0.0,
                               "Std of Gaussian pixel noise added (0: flat shapes)."),
      shuffle_buffer=flags.DEFINE_integer("shuffle_buffer", 1000, "Pipeline shuffle buffer."),
      shuffle_block=flags.DEFINE_integer("shuffle_block", 1,
                                         "config.input.shuffle_block of the shuffled stages."),
      repeats=flags.DEFINE_integer("repeats", 3, "Timed passes per stage (best is reported)."),
      workdir=flags.DEFINE_string("workdir", None,
                                  "Where to write the data (default: a temp dir)."),
      cpu=flags.DEFINE_integer("cpu", None, "CPU to pin to (default: the last one allowed)."))


def main(argv, flag_values):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  values = {k: v.value for k, v in flag_values.items()}
  cpu = pin_to_one_cpu(values.pop("cpu"))
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  result = run(**values)
  result.update(cpu_pinned=cpu, machine=machine(), command=" ".join(sys.argv))
  print(f"{result['num']} images of {result['image_size']} px, JPEG q{result['quality']} "
        f"(mean {result['mean_jpeg_bytes'] / 1024:.1f} KiB), batch {result['batch']}, "
        f"pinned to CPU {cpu}:")
  print(format_table(result))
  print(json.dumps(result))


if __name__ == "__main__":
  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS))
