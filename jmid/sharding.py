"""Device mesh and the ONE table mapping logical axis names to mesh axes.

Layers name their dimensions logically (`embed`, `heads`, ...); only this file knows mesh axes.
A dimension whose size the mesh axes do not divide is replicated instead of failing, so a small
model still runs on a large mesh (the batch is the exception: config validation checks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jmid.config import MeshConfig
from jmid.errors import ConfigError

AXES = ("data", "fsdp", "tensor", "context")

# logical name -> mesh axes. Activations use the same names; `None` means replicated.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": ("context",),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "layers": (),
}

Names = Sequence[str | None]


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
  """Resolves -1 to the remaining devices; raises ConfigError when the sizes cannot fit."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor, cfg.context]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise ConfigError(f"mesh: the fixed axes multiply to {known}, which does not divide the "
                        f"{n_devices} devices; pick sizes whose product divides {n_devices}")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ConfigError(
        f"mesh: data*fsdp*tensor*context = {'*'.join(map(str, sizes))} = {math.prod(sizes)} "
        f"but there are {n_devices} devices; make the product {n_devices} or set one axis to -1")
  return tuple(sizes)


def granule(device: jax.Device) -> int:
  """The node or slice a device belongs to, i.e. what the links between them are slow across:
  a TPU slice (DCN between slices); elsewhere a process, since jmid runs one per GPU node."""
  return int(getattr(device, "slice_index", 0)) if device.platform == "tpu" else device.process_index


def dcn_shape(cfg: MeshConfig, n_granules: int, per_granule: int) -> tuple[int, int]:
  """(dcn_data, dcn_fsdp): how many nodes/slices the data and fsdp axes span. Processes of
  one device each (one process per GPU, as some launchers start them) say nothing of nodes:
  by default they make one flat mesh, as before there were hybrid meshes."""
  if cfg.dcn_data == 0 and cfg.dcn_fsdp == 1 and per_granule == 1:
    return 1, 1
  if n_granules % cfg.dcn_fsdp:
    raise ConfigError(f"mesh.dcn_fsdp={cfg.dcn_fsdp} does not divide the {n_granules} "
                      "nodes/slices of this job; use a divisor of it")
  dcn_data = cfg.dcn_data or n_granules // cfg.dcn_fsdp
  if dcn_data * cfg.dcn_fsdp not in (1, n_granules):
    raise ConfigError(f"mesh.dcn_data*dcn_fsdp = {dcn_data}*{cfg.dcn_fsdp} but this job has "
                      f"{n_granules} nodes/slices; make the product {n_granules} (or set "
                      "mesh.dcn_data=0 for the rest)")
  return dcn_data, cfg.dcn_fsdp


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None,
              granule_of: Callable[[jax.Device], int] = granule) -> Mesh:
  """A 4-axis mesh (data, fsdp, tensor, context) with Auto axis types.

  Over several nodes/slices it is a hybrid mesh: data, fsdp, tensor and context lay out the
  devices of one node/slice (fast links: NVLink, ICI) and dcn_data/dcn_fsdp repeat that block
  across nodes/slices, so only the collectives of those two axes cross the slow links.
  """
  devices = list(devices) if devices is not None else jax.devices()
  groups: dict[int, list[jax.Device]] = {}
  for d in devices:
    groups.setdefault(granule_of(d), []).append(d)
  dcn = dcn_shape(cfg, len(groups), len(devices) // len(groups))
  axis_types = (AxisType.Auto,) * len(AXES)
  if math.prod(dcn) == 1:
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
  sizes = {len(g) for g in groups.values()}
  if len(sizes) > 1:
    raise ConfigError(f"mesh: the nodes/slices hold different numbers of devices "
                      f"({sorted(sizes)}); give every node the same number of devices")
  per = sizes.pop()
  try:
    inner = mesh_shape(cfg, per)
  except ConfigError as e:
    raise ConfigError(f"{e} (of one node/slice: mesh.data/fsdp/tensor/context lay out the {per} "
                      f"devices of each of the {len(groups)} nodes/slices; mesh.dcn_data/dcn_fsdp "
                      "span nodes)") from None
  blocks = np.empty(dcn, dtype=object)
  for i, key in enumerate(sorted(groups)):
    blocks[np.unravel_index(i, dcn)] = mesh_utils.create_device_mesh(
        inner, groups[key], allow_split_physical_axes=True)
  # (dcn_data, dcn_fsdp) blocks of inner meshes -> axis a has size inner[a] * dcn[a]
  rows = [np.concatenate(list(blocks[i]), axis=1) for i in range(dcn[0])]
  return Mesh(np.concatenate(rows, axis=0), AXES, axis_types=axis_types)


def logical_spec(names: Names, shape: Sequence[int] | None = None,
                 mesh_sizes: dict[str, int] | None = None) -> P:
  """PartitionSpec for logical `names`; axes that would not divide `shape` are dropped."""
  used: set[str] = set()
  out: list[Any] = []
  for i, name in enumerate(names):
    axes = [a for a in (RULES[name] if name else ()) if a not in used]
    if mesh_sizes is not None:
      axes = [a for a in axes if mesh_sizes.get(a, 1) > 1]
      if shape is not None and axes and shape[i] % math.prod(mesh_sizes[a] for a in axes):
        axes = []
    used.update(axes)
    out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def named_sharding(mesh: Mesh, names: Names, shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(names, shape, dict(mesh.shape)))


def tree_shardings(mesh: Mesh, names_tree: Any, abstract_tree: Any) -> Any:
  """NamedShardings for a tree of arrays, given a matching tree of logical-name tuples."""
  return jax.tree.map(lambda n, a: named_sharding(mesh, n, a.shape), names_tree, abstract_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over (data, fsdp), sequence over context; used for every [B, T] batch array."""
  return NamedSharding(mesh, logical_spec(("batch", "length"), None, dict(mesh.shape)))


def constrain(x: jax.Array, names: Names) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside a mesh (e.g. plain CPU use)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, dict(mesh.shape)))


def context_size() -> int:
  """How many devices each row's sequence is split over in the current mesh (1 outside one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else int(math.prod(dict(mesh.shape).get(a, 1) for a in RULES["length"]))


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
  """Bytes of `tree`'s addressable shards on each device (to check that FSDP shards)."""
  out: dict[jax.Device, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.size * shard.data.dtype.itemsize
  return out


def batch_divisor(mesh: Mesh) -> int:
  """How many ways a batch's rows are split: data * fsdp."""
  return int(np.prod([mesh.shape[a] for a in RULES["batch"]]))


def to_global(batch: dict[str, np.ndarray], batch_sh: jax.sharding.Sharding) -> dict:
  """This process's rows -> global arrays sharded over (data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in batch.items()}
