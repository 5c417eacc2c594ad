r"""Per-device memory of the train step, from XLA's compiled memory analysis (nothing allocated).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
  python -m locca_jax.memory --config=configs/locca_b16.py --models=B/16:6,L/16:12 \
      --meshes=data,fsdp --batch=256

For every model (`VARIANT:DECODER_LAYERS`, the decoder as wide as the encoder) and mesh
(`data`: all devices data-parallel; `fsdp`: all devices on the fsdp axis; `tensor`: all on the
tensor axis), lowers and compiles the jitted train step against abstract state and batch
(ShapeDtypeStructs carrying the shardings of `train_step.make_state_spec`) and reports, per
device: the train state (params + optimizer state, summed from the shard shapes), the
compiled program's arguments, outputs, temporaries, and their peak
`arguments + outputs - aliased + temporaries` (the donated state aliases its outputs).
Prints a Markdown table and one JSON line per row. Imports no TensorFlow.

The numbers are those of the backend that compiles: on CPU (simulated devices) temporaries
differ from a GPU's or TPU's (other fusion, bf16 upcast), while the state and argument sizes
are the same on every backend.
"""
import dataclasses
import json
import math

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from locca_jax import sharding
from locca_jax import train_step
from locca_jax.models import locca

GIB = 2 ** 30


def mesh_axes(layout: str) -> tuple[tuple[str, int], ...]:
  """A layout name -> `config.mesh` with every device on that axis."""
  if layout not in sharding.MESH_AXES:
    raise ValueError(f"--meshes: {layout!r} unknown (expected one of {sharding.MESH_AXES})")
  return tuple((axis, -1 if axis == layout else 1) for axis in sharding.MESH_AXES)


def parse_model(entry: str) -> tuple[str, int]:
  """"L/16:12" -> ("L/16", 12)."""
  variant, _, layers = entry.partition(":")
  if not layers.isdigit():
    raise ValueError(f"--models: {entry!r} should be VARIANT:DECODER_LAYERS, e.g. 'L/16:12'")
  return variant, int(layers)


def per_device_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for x in jax.tree_util.tree_leaves(abstract_tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return total


@dataclasses.dataclass
class MemoryRow:
  model: str
  mesh: str
  devices: int
  batch: int
  params_m: float  # millions
  state_gib: float  # params + optimizer state, per device
  arguments_gib: float
  outputs_gib: float
  aliased_gib: float
  temporaries_gib: float
  peak_gib: float


def train_step_memory(config, mesh, batch_size: int, vocab_size: int) -> dict:
  """Compiled memory analysis of the train step of `config` on `mesh` (per device, bytes)."""
  model = locca.make_model(config.model, vocab_size, config.input.seq_len)
  spec = train_step.make_state_spec(model, config, mesh)
  step_fn = train_step.make_train_step(model, spec.tx, config, mesh, spec.shardings)
  size, rows, seq_len = config.input.image_size, len(config.input.tasks), config.input.seq_len
  batch_sh = sharding.batch_sharding(mesh)
  batch = dict(
      image=jax.ShapeDtypeStruct((batch_size, size, size, 3), np.uint8, sharding=batch_sh),
      text=jax.ShapeDtypeStruct((batch_size, rows, seq_len), np.int32, sharding=batch_sh),
      mask_loss=jax.ShapeDtypeStruct((batch_size, rows, seq_len), np.float32,
                                     sharding=batch_sh))
  with jax.set_mesh(mesh):
    compiled = step_fn.jitted.lower(spec.abstract, batch).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise RuntimeError(f"{jax.default_backend()}: the compiler gives no memory analysis")
  args, outs = analysis.argument_size_in_bytes, analysis.output_size_in_bytes
  alias, temp = analysis.alias_size_in_bytes, analysis.temp_size_in_bytes
  num_params = sum(math.prod(x.shape)
                   for x in jax.tree_util.tree_leaves(spec.abstract["params"]))
  return dict(num_params=num_params, state=per_device_bytes(spec.abstract), arguments=args,
              outputs=outs, aliased=alias, temporaries=temp, peak=args + outs - alias + temp)


def memory_rows(config, models, layouts, batch_size: int, vocab_size: int) -> list[MemoryRow]:
  """One row per (model, layout); `config` itself is left unchanged."""
  config = config.copy_and_resolve_references()
  out = []
  for entry in models:
    variant, decoder_layers = parse_model(entry)
    # The variant decides the sizes; the decoder takes the encoder's width.
    config.model.encoder.update(variant=variant, width=None, depth=None, mlp_dim=None,
                                num_heads=None)
    config.model.decoder.update(num_layers=decoder_layers, width=None, mlp_dim=None,
                                num_heads=None)
    for layout in layouts:
      mesh = sharding.make_mesh(mesh_axes(layout))
      m = train_step_memory(config, mesh, batch_size, vocab_size)
      out.append(MemoryRow(
          model=f"{variant} enc + {decoder_layers}-layer dec", mesh=f"{layout}={mesh.size}",
          devices=mesh.size, batch=batch_size, params_m=m["num_params"] / 1e6,
          state_gib=m["state"] / GIB, arguments_gib=m["arguments"] / GIB,
          outputs_gib=m["outputs"] / GIB, aliased_gib=m["aliased"] / GIB,
          temporaries_gib=m["temporaries"] / GIB, peak_gib=m["peak"] / GIB))
  return out


def markdown(rows: list[MemoryRow]) -> str:
  head = ("| model | mesh | global batch | params (M) | state / device (GiB) | "
          "temporaries (GiB) | peak / device (GiB) |")
  lines = [head, "|" + "---|" * 7]
  for r in rows:
    lines.append(f"| {r.model} | {r.mesh} | {r.batch} | {r.params_m:.1f} | {r.state_gib:.3f} "
                 f"| {r.temporaries_gib:.2f} | {r.peak_gib:.2f} |")
  return "\n".join(lines)


def _define_flags():
  """The command's flags, defined only when run as a program (tests import this module)."""
  return dict(
      config=config_flags.DEFINE_config_file("config", None, "Training config file.",
                                             lock_config=False),
      models=flags.DEFINE_list("models", ["B/16:6"],
                               "VARIANT:DECODER_LAYERS entries, e.g. B/16:6,L/16:12."),
      meshes=flags.DEFINE_list("meshes", ["data", "fsdp"], "Mesh layouts: data, fsdp, tensor."),
      batch=flags.DEFINE_integer("batch", None,
                                 "Global batch (default: config.input.batch_size)."),
      vocab_size=flags.DEFINE_integer("vocab_size", 32_000, "Vocabulary size."))


def main(argv, flag_values):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = flag_values["config"].value
  rows = memory_rows(config, flag_values["models"].value, flag_values["meshes"].value,
                     flag_values["batch"].value or config.input.batch_size,
                     flag_values["vocab_size"].value)
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}, compute {config.model.dtype}, remat "
        f"{config.model.remat_policy}, scan {config.model.scan}, "
        f"{len(config.input.tasks)} task rows x {config.input.seq_len} tokens, "
        f"{config.input.image_size} px")
  print(markdown(rows))
  for r in rows:
    print(json.dumps(dataclasses.asdict(r)))


if __name__ == "__main__":
  _FLAGS = _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: main(argv, _FLAGS))
