"""Host batches onto the mesh: the one way a MixedBatch (numpy, this process's rows) becomes
global jax.Arrays whose batch axis is split over the mesh's batch shards.

Every process passes its own rows; `jax.make_array_from_process_local_data` stitches them into
one global array per field, so the train step sees the global batch (ITC over all hosts, as the
official code gathers over GPUs: docs/fidelity.md#itc-loss). Host-only
bookkeeping (record_id, source_id) stays on the host.

Region texts point at their image through `image_index`, a host-local slot number; in the
global arrays this host's image slots start at some row offset, so the index is shifted by that
offset here to stay correct after stitching.

Gradient accumulation: `put(micro_batches, mesh)` with A > 1 host batches stacks them into
[A, B, ...] leaves (micro-batch axis first, the batch axis second and sharded).

`put_global(x, mesh)` is the other case: an array that every process holds in full (evaluation
sets are built identically on every process).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from data_pipelines import features as F
from x2vlm_jax import sharding


def device_fields(batch: Mapping[str, Mapping[str, Any]]) -> dict:
  """The MixedBatch without its host-only bookkeeping fields (record ids)."""
  return {
    kind: {k: v for k, v in fields.items() if k not in F.HOST_ONLY_FIELDS}
    for kind, fields in batch.items()
  }


def shardings(batch: Mapping, mesh: Mesh, batch_axis: int = 0):
  """NamedShardings of a (device) MixedBatch: axis `batch_axis` split over the batch shards."""
  return jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim, batch_axis), batch)


def _local_row_range(
  sh: jax.sharding.Sharding, global_shape: tuple[int, ...], axis: int
) -> tuple[int, int]:
  """[start, stop) of the global rows of `axis` held by this process's devices."""
  rows = set()
  for index in sh.addressable_devices_indices_map(global_shape).values():
    rows.update(range(*index[axis].indices(global_shape[axis])))
  start, stop = min(rows), max(rows) + 1
  if stop - start != len(rows):
    raise ValueError(
      f"this process's devices hold non-contiguous batch rows {sorted(rows)}; "
      "order the mesh devices by process"
    )
  return start, stop


def global_batch_size(mesh: Mesh, local: int) -> int:
  """Global size of a batch axis of host-local size `local`.

  Each process feeds the rows of the batch shards its devices hold; with the usual mesh (devices
  ordered by process) that is shards / process_count shards, so global = local x process_count.
  """
  shards = sharding.batch_shards(mesh)
  sh = sharding.batch_sharding(mesh, 1)
  local_shards = len(
    {idx[0].indices(shards)[0] for idx in sh.addressable_devices_indices_map((shards,)).values()}
  )
  if local % local_shards:
    raise ValueError(
      f"host-local batch of {local} rows cannot be split over the {local_shards} "
      f"batch shards of this process (mesh {dict(mesh.shape)})"
    )
  return local // local_shards * shards


def _put_kind(kind: str, fields: Mapping[str, np.ndarray], mesh: Mesh, axis: int) -> dict:
  placed, offset = {}, None
  for name, arr in fields.items():
    if name in F.HOST_ONLY_FIELDS:
      continue
    arr = np.asarray(arr)
    try:
      global_n = global_batch_size(mesh, arr.shape[axis])
    except ValueError as e:
      raise ValueError(f"{kind}/{name}: {e}") from None
    global_shape = arr.shape[:axis] + (global_n,) + arr.shape[axis + 1 :]
    sh = sharding.batch_sharding(mesh, arr.ndim, axis)
    if name == F.PIXELS and kind == F.REGION:
      offset = _local_row_range(sh, global_shape, axis)[0]
    placed[name] = (arr, sh, global_shape)
  out = {}
  for name, (arr, sh, global_shape) in placed.items():
    if name == F.IMAGE_INDEX and offset:
      arr = arr + np.int32(offset)
    out[name] = jax.make_array_from_process_local_data(sh, arr, global_shape)
  return out


def put(micro_batches: Sequence[Mapping[str, Mapping[str, np.ndarray]]], mesh: Mesh) -> dict:
  """kind -> field -> global jax.Array (host-only fields dropped).

  One host batch: its batch axis (0) over the mesh's batch shards. A > 1 host batches (the
  micro-batches of one update): stacked to [A, B, ...], the batch axis (1) sharded.
  Raises ValueError naming kind/field when a host-local batch axis does not divide over this
  process's batch shards.
  """
  if isinstance(micro_batches, Mapping):
    raise TypeError("put takes a sequence of host batches (one per micro-batch)")
  if len(micro_batches) == 1:
    batch, axis = micro_batches[0], 0
  else:
    batch, axis = jax.tree.map(lambda *a: np.stack(a), *map(device_fields, micro_batches)), 1
  return {kind: _put_kind(kind, fields, mesh, axis) for kind, fields in batch.items()}


def put_global(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """An array every process holds in full (e.g. an evaluation batch) -> a global array whose
  leading axis is split over the batch shards; each device takes its slice."""
  sh = sharding.batch_sharding(mesh, x.ndim)
  return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
