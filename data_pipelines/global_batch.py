"""Host-local MixedBatch (numpy) -> global jax.Arrays with the batch axis over ('data', 'fsdp').

Every process passes its own rows; `jax.make_array_from_process_local_data` stitches them into
one global array per field, so the train step sees the global batch (ITC over all hosts, as the
official code gathers over GPUs, reference §4.1). Host-only bookkeeping (record_id, source_id)
stays on the host.

Region texts point at their image through `image_index`, a host-local slot number; in the
global arrays this host's image slots start at some row offset, so the index is shifted by that
offset here to stay correct after stitching.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from data_pipelines import features as F
from x2vlm_jax import sharding


def _local_row_range(sh: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
  """[start, stop) of the global leading-axis rows held by this process's devices."""
  rows = set()
  for index in sh.addressable_devices_indices_map(global_shape).values():
    sl = index[0]
    rows.update(range(*sl.indices(global_shape[0])))
  start, stop = min(rows), max(rows) + 1
  if stop - start != len(rows):
    raise ValueError(f"this process's devices hold non-contiguous batch rows {sorted(rows)}; "
                     "order the mesh devices by process")
  return start, stop


def _row_shards(mesh: Mesh) -> tuple[int, int]:
  """(number of batch-row shards of the mesh, how many distinct ones this process holds)."""
  shards = int(np.prod([mesh.shape[a] for a in sharding.LOGICAL_RULES["batch"]]))
  sh = sharding.batch_sharding(mesh, 1)
  local = {idx[0].indices(shards)[0]
           for idx in sh.addressable_devices_indices_map((shards,)).values()}
  return shards, len(local)


def global_batch_size(mesh: Mesh, local: int) -> int:
  """Global size of a leading axis of host-local size `local` (batch sharded over data x fsdp).

  Each process feeds the rows of the batch shards its devices hold; with the usual mesh (devices
  ordered by process) that is shards / process_count shards, so global = local x process_count.
  """
  shards, local_shards = _row_shards(mesh)
  if local % local_shards:
    raise ValueError(f"host-local batch of {local} rows cannot be split over the {local_shards} "
                     f"batch shards of this process (mesh {dict(mesh.shape)})")
  return local // local_shards * shards


def to_global(batch: Mapping[str, Mapping[str, np.ndarray]], mesh: Mesh) -> dict:
  """kind -> field -> global jax.Array (host-only fields dropped), batch axis over data x fsdp.

  Raises ValueError naming kind/field when a host-local leading axis does not divide over this
  process's batch shards.
  """
  out = {}
  for kind, fields in batch.items():
    out[kind] = {}
    offset = None
    for name, arr in fields.items():
      if name in F.HOST_ONLY_FIELDS:
        continue
      arr = np.asarray(arr)
      try:
        global_n = global_batch_size(mesh, arr.shape[0])
      except ValueError as e:
        raise ValueError(f"{kind}/{name}: {e}") from None
      global_shape = (global_n,) + arr.shape[1:]
      sh = sharding.batch_sharding(mesh, arr.ndim)
      if name == F.PIXELS and kind == F.REGION:
        offset = _local_row_range(sh, global_shape)[0]
      out[kind][name] = (arr, sh, global_shape)
    for name, (arr, sh, global_shape) in out[kind].items():
      if name == F.IMAGE_INDEX and offset:
        arr = arr + np.int32(offset)
      out[kind][name] = jax.make_array_from_process_local_data(sh, arr, global_shape)
  return out
