"""All sharding decisions live here: mesh axes, the logical-axis rules, and placement helpers.

Parameters carry *logical* axis names (via `nnx.with_partitioning`); this module maps them to the
mesh axes ('data', 'fsdp', 'tensor'). The rules table has exactly one entry per logical name and
`check_rules_cover` verifies that every name used by a model is in it (NNX would otherwise let an
unknown name pass through silently as "replicated").

A dimension that the mapped mesh axes do not divide evenly is replicated instead (and reported), so
oddly sized test models run on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from x2vlm_jax import treepath

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). One entry per name.
LOGICAL_RULES: dict[str, Any] = {
  # parameters
  "embed": "fsdp",  # model width of any tower (vision, text, fusion)
  "mlp": "tensor",  # FFN hidden units
  "heads": "tensor",  # attention heads
  "kv": None,  # per-head feature (d_h)
  "qkv": None,  # the q/k/v selector axis of a fused projection
  "vocab": "tensor",  # word-piece vocabulary
  "proj": None,  # ITC embedding (256)
  "classes": None,  # head outputs (2 for ITM, 4 for boxes)
  "layers": None,  # stacked-layer axis of scanned towers
  "rel_pos": None,  # rows of a relative-position-bias table
  "positions": None,  # rows of a position-embedding table
  "frames": None,  # video frame axis
  "patch": None,  # kernel height/width/channels of the patch embedding
  "norm": None,  # LayerNorm scale/bias (small; replicated)
  # activations
  "batch": ("data", "fsdp"),
  "seq": None,
  "act_embed": None,
  "act_mlp": "tensor",
  "act_heads": "tensor",
}


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices=None) -> Mesh:
  """Builds a ('data', 'fsdp', 'tensor') mesh. One size may be -1: it takes the remaining
  devices."""
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
  n = len(devices)
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n % known:
      raise ValueError(f"{n} devices cannot be split into mesh {sizes}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {n}"
    )
  if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
    # jax.make_mesh refuses multi-slice topologies; keep the given device order there.
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES)
  # jax.make_mesh orders devices by the physical topology (rings on TPU, so collectives along
  # each axis use neighbouring chips); Auto axes: shardings come from annotations, not types.
  return jax.make_mesh(
    sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(
  names: Sequence[str | None] | None,
  shape: Sequence[int] | None = None,
  mesh: Mesh | None = None,
  rules: Mapping[str, Any] = LOGICAL_RULES,
) -> P:
  """Logical names -> PartitionSpec. With shape and mesh, non-dividing axes fall back to None."""
  if names is None:
    return P()
  out, used = [], set()
  for i, name in enumerate(names):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule; add it to LOGICAL_RULES")
    axes = rules[name]
    if axes is not None:
      flat = (axes,) if isinstance(axes, str) else tuple(axes)
      # A mesh axis may appear only once per spec; and the dim must divide evenly.
      if used & set(flat):
        axes = None
      elif shape is not None and mesh is not None and shape[i] % _axis_size(mesh, axes):
        axes = None
      else:
        used |= set(flat)
    out.append(axes)
  return P(*out)


def logical_sharding(names, shape, mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def batch_shards(mesh: Mesh | None) -> int:
  """How many pieces the batch axis is split into on `mesh` (its 'batch' rule); 1 without a mesh."""
  return 1 if mesh is None else _axis_size(mesh, LOGICAL_RULES["batch"])


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Axis `batch_axis` split as the 'batch' rule says, every other axis replicated."""
  spec = [None] * ndim
  spec[batch_axis] = LOGICAL_RULES["batch"]
  return NamedSharding(mesh, P(*spec))


def _names_of(var) -> tuple | None:
  """The logical axis names `nnx.with_partitioning` stored on a variable (None if unannotated)."""
  names = var.get_metadata().get("out_sharding")
  return None if names is None else tuple(names)


def state_shardings(state, mesh: Mesh, rules=LOGICAL_RULES):
  """Maps an nnx.State (abstract or concrete) to a matching tree of NamedShardings."""
  from flax import nnx

  def one(var):
    names = _names_of(var)
    return logical_sharding(names, var.get_value().shape, mesh, rules)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def check_rules_cover(state, rules=LOGICAL_RULES) -> list[str]:
  """Returns the paths of parameters without a complete annotation (empty list = all covered)."""
  from flax import nnx

  bad = []
  for path, var in nnx.to_flat_state(state):
    names = _names_of(var)
    shape = var.get_value().shape
    if (
      names is None
      or len(names) != len(shape)
      or any(n is not None and n not in rules for n in names)
    ):
      bad.append(treepath.path_str(path, "/"))
  return bad


def sharding_report(state, mesh: Mesh, rules=LOGICAL_RULES) -> str:
  """A table of every parameter's logical names, partition spec and bytes per device."""
  from flax import nnx

  lines, total = [], 0
  for path, var in nnx.to_flat_state(state):
    arr = var.get_value()
    names = _names_of(var)
    spec = logical_to_spec(names, arr.shape, mesh, rules)
    shard_elems = math.prod(arr.shape)
    for dim, axes in zip(arr.shape, tuple(spec) + (None,) * (len(arr.shape) - len(spec))):
      if axes is not None:
        shard_elems = shard_elems // _axis_size(mesh, axes) if dim else shard_elems
    nbytes = shard_elems * np.dtype(arr.dtype).itemsize
    total += nbytes
    lines.append(
      f"{treepath.path_str(path, '/'):<70} {str(tuple(arr.shape)):<22} {str(names):<40} "
      f"{spec} {nbytes:,} B"
    )
  lines.append(f"total parameter bytes per device: {total:,} ({total / 2**20:.1f} MiB)")
  return "\n".join(lines)
