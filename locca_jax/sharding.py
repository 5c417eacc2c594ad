"""Device mesh, logical-axis rules, and the shardings of params, optimizer state and batches.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel whose params and optimizer state
are sharded along their `embed` dimension), `tensor` (attention heads, MLP hidden units and the
vocabulary split across devices). The batch is split over data × fsdp.
"""
import math
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters use the plain names, activations the `act_` ones
# (an activation's batch already uses `fsdp`, so its `embed` must stay unsharded).
LOGICAL_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(mesh_config: Sequence[tuple[str, int]],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh from `config.mesh`, e.g. (("data", -1), ("fsdp", 1), ("tensor", 1)).

  One size may be -1: it takes all remaining devices. Axes missing from the config get size 1.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(mesh_config)
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh names {sorted(unknown)}; expected axes from {MESH_AXES}")
  shape = [sizes.get(name, 1) for name in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh {mesh_config}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"config.mesh {mesh_config} -> shape {shape} needs {math.prod(shape)} "
                     f"devices, but there are {len(devices)}")
  device_array = np.asarray(devices).reshape(shape)
  if len(devices) > 1 and devices == list(jax.devices()):
    # Lays out the mesh along the physical interconnect (TPU torus, NVLink islands).
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(device_array, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_RULES) -> P:
  """PartitionSpec for an array with logical axis `names`.

  A dimension that does not divide evenly over its mesh axes stays replicated (logged once),
  so odd sizes (a 1000-piece vocabulary on 8-way tensor parallelism) still run.
  """
  rule = dict(rules)
  spec, used = [], set()
  for name, size in zip(names, shape):
    axes = rule.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes):
      logging.info("Replicating a dim of size %d named %r: not divisible by mesh axes %s",
                   size, name, axes)
      axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def _is_boxed(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh) -> Any:
  """NamedShardings for the (unboxed) params, from their logical-axis boxes."""
  def one(x):
    if _is_boxed(x):
      return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map(one, abstract_boxed_params, is_leaf=_is_boxed)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def matching_shardings(abstract_tree: Any, params_shapes: Any, params_sharding: Any,
                       mesh: Mesh) -> Any:
  """Shardings for a tree of per-parameter statistics (optimizer state).

  A leaf whose path ends with a parameter's path and has that parameter's shape is sharded
  like it (momentum, unfactored second moments); anything else (factored row/column
  statistics, step counts) is small and replicated.
  """
  by_path = {}
  for (path, shape), sharding in zip(
      jax.tree_util.tree_flatten_with_path(params_shapes)[0],
      jax.tree_util.tree_leaves(params_sharding)):
    by_path[_path_str(path)] = (shape.shape, sharding)

  def one(path, leaf):
    path = _path_str(path)
    for param_path, (shape, sharding) in by_path.items():
      if (path == param_path or path.endswith("/" + param_path)) and leaf.shape == shape:
        return sharding
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data × fsdp; everything else replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's slice of the batch -> global `jax.Array`s sharded over data × fsdp."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
