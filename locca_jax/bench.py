r"""Benchmarks the jitted train step and KV-cache decoding on synthetic device-resident data.

  python -m locca_jax.bench --config=configs/locca_b16.py --batch=256 --tasks=cap
  python -m locca_jax.bench --config=configs/locca_b16.py:runlocal --batch=32 --steps=5

Prints a table and one JSON line: step time (median over repeats of `--steps` steps, warm-up
and compilation excluded, one host sync per repeat), images/s, model FLOPs per image
(`locca_jax.flops`, analytic), MFU against the device's peak (`PEAK_FLOPS`; `--peak_tflops`
overrides), peak device memory, and greedy decoding tokens/s with the KV cache vs re-running
the decoder per token. Imports no TensorFlow: runs on accelerator hosts without it.
"""
import json
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from ml_collections import config_flags

from locca_jax import decode
from locca_jax import flops as flops_lib
from locca_jax import sharding
from locca_jax import train_step
from locca_jax.models import locca

# Dense bf16 peak FLOP/s per chip by `device_kind` (vendor datasheets, no sparsity).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


def _peak_flops(device: jax.Device, peak_tflops: float | None = None) -> float | None:
  if peak_tflops:
    return peak_tflops * 1e12
  kind = device.device_kind
  return PEAK_FLOPS.get(kind) or next(
      (v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def _timed(fn, repeats: int) -> float:
  """Median seconds of `fn()` (which must block on its own result) over `repeats`."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_train_step(config, batch_size: int, vocab_size: int, steps: int,
                     repeats: int, peak_tflops: float | None = None) -> dict:
  mesh = sharding.make_mesh(config.mesh)
  model = locca.make_model(config.model, vocab_size, config.input.seq_len)
  spec = train_step.make_state_spec(model, config, mesh)
  state = spec.init()
  step_fn = train_step.make_train_step(model, spec.tx, config, mesh, spec.shardings)
  size, seq_len, rows = config.input.image_size, config.input.seq_len, len(config.input.tasks)
  rng = np.random.default_rng(0)
  batch = sharding.global_batch(dict(
      image=rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),  # as the pipeline
      text=rng.integers(2, vocab_size, (batch_size, rows, seq_len)).astype(np.int32),
      mask_loss=np.ones((batch_size, rows, seq_len), np.float32)), mesh)

  def run_steps():
    nonlocal state
    for _ in range(steps):
      state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)

  run_steps()  # compile + warm-up
  seconds = _timed(run_steps, repeats) / steps
  device = jax.devices()[0]
  flops_per_image = flops_lib.train_flops_per_image(model, size, rows, seq_len)
  peak = _peak_flops(device, peak_tflops)
  img_per_sec = batch_size / seconds
  memory = (device.memory_stats() or {}).get("peak_bytes_in_use")
  enc, dec = config.model.encoder, config.model.decoder
  return dict(
      device=device.device_kind, num_devices=jax.device_count(),
      encoder=enc.variant + "".join(f" {k}={enc[k]}" for k in ("width", "depth") if enc.get(k)),
      decoder_layers=dec.num_layers,
      params_m=sum(x.size for x in jax.tree_util.tree_leaves(state["params"])) / 1e6,
      batch=batch_size, rows_per_image=rows, seq_len=seq_len, image_size=size, vocab_size=vocab_size,
      dtype=config.model.dtype, remat=config.model.remat_policy, scan=config.model.scan,
      attention=model.encoder["attention"], step_ms=seconds * 1e3, img_per_sec=img_per_sec,
      gflop_per_image=flops_per_image / 1e9,
      mfu=(img_per_sec * flops_per_image / (peak * jax.device_count())) if peak else None,
      peak_memory_gib=memory / 2**30 if memory else None)


def bench_decode(config, batch_size: int, vocab_size: int, decode_len: int,
                 repeats: int) -> dict:
  """Greedy decoding of `decode_len` tokens after a one-token prompt, cached vs re-run."""
  seq_len = decode_len + 1
  model = locca.make_model(config.model, vocab_size, seq_len)
  size = config.input.image_size
  images = np.zeros((batch_size, size, size, 3), np.float32)
  prompts = np.full((batch_size, 1), 5, np.int32)
  prompt_lens = np.ones((batch_size,), np.int32)
  dummy = train_step.dummy_inputs(size, 1, seq_len)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), *dummy)["params"])()
  params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params,
                                  is_leaf=lambda x: hasattr(x, "names"))
  # An eos bias of -1e9 means eos is never chosen: both decode exactly decode_len tokens.
  params["txt"]["head"]["bias"] = params["txt"]["head"]["bias"].at[1].set(-1e9)
  kwargs = dict(max_len=decode_len, eos_id=1)
  result = {}
  for name, fn in (("cached", decode.decode), ("rerun", decode.decode_without_cache)):
    run = lambda fn=fn: np.asarray(fn(model, params, images, prompts, prompt_lens, **kwargs))  # pylint: disable=unnecessary-lambda-assignment
    run()  # compile
    seconds = _timed(run, repeats)
    result[f"decode_{name}_tok_per_sec"] = batch_size * decode_len / seconds
  result["decode_speedup"] = (result["decode_cached_tok_per_sec"]
                              / result["decode_rerun_tok_per_sec"])
  return result


def _table(result: dict) -> str:
  rows = [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in result.items()]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _define_flags():
  """The command's flags, defined only when run as a program (importing defines none)."""
  return dict(
      config=config_flags.DEFINE_config_file("config", None, "Training config file.",
                                             lock_config=False),
      batch=flags.DEFINE_integer("batch", None,
                                 "Global batch (default: config.input.batch_size)."),
      tasks=flags.DEFINE_enum("tasks", "all", ["cap", "all"],
                              "cap: one Cap row per image (CapPa-equal work); all: config's "
                              "tasks."),
      vocab_size=flags.DEFINE_integer("vocab_size", 32_000,
                                      "Vocabulary size of the synthetic text."),
      steps=flags.DEFINE_integer("steps", 10, "Train steps per timed repeat."),
      repeats=flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported)."),
      decode_batch=flags.DEFINE_integer("decode_batch", 8,
                                        "Images per decoding batch (0: skip)."),
      decode_len=flags.DEFINE_integer("decode_len", 64, "Tokens decoded per sequence."),
      peak_tflops=flags.DEFINE_float("peak_tflops", None,
                                     "Device peak TFLOP/s for MFU (default: table)."))


def main(argv, flag_values):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  v = {k: f.value for k, f in flag_values.items()}
  config = v["config"]
  if v["tasks"] == "cap":
    config.input.tasks = ("cap",)
  batch_size = v["batch"] or config.input.batch_size
  result = bench_train_step(config, batch_size, v["vocab_size"], v["steps"], v["repeats"],
                            v["peak_tflops"])
  if v["decode_batch"]:
    result.update(bench_decode(config, v["decode_batch"], v["vocab_size"], v["decode_len"],
                               v["repeats"]))
  logging.info("jax %s on %s", jax.__version__, result["device"])
  print(_table(result))
  print(json.dumps(result))


if __name__ == "__main__":
  _FLAGS = _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: main(argv, _FLAGS))
