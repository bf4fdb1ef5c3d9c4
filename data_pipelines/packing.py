"""Fixed-shape assembly of per-example dicts into one kind's sub-batch.

`make_example` (data_pipelines/examples.py) returns one example per record, without the batch axis:

  image:  pixels [R, R, 3] uint8 + the text fields ([L] / [M] each)
  video:  frames [F, R, R, 3] uint8, frame_valid [F] + the text fields
  region: pixels [R, R, 3] uint8 (the image) + per-text fields with a leading [n] axis,
          1 <= n <= max_regions: text fields [n, L] / [n, M], box [n, 4], patch_mask [n, T],
          is_image [n]

The functions here turn a list of such examples into arrays that match `features.batch_spec`
exactly; the bookkeeping fields (valid, record_id, source_id, image_id for images and videos,
and for regions image_valid and image_index) are added here, never by `make_example`. Missing
rows (a finite stream that ran out) are zeros with valid = 0 and record_id = source_id =
image_id = -1, so shapes never change.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import grain
import numpy as np

from data_pipelines import features as F
from data_pipelines import workers

# Fields the packer owns: make_example must not produce them.
_BOOKKEEPING = (F.VALID, F.RECORD_ID, F.SOURCE_ID, F.IMAGE_ID, F.IMAGE_VALID, F.IMAGE_INDEX)
# Region fields that belong to the image slot rather than to a text.
_REGION_IMAGE_FIELDS = (F.PIXELS,)


@dataclasses.dataclass(frozen=True)
class Tagged:
  """One example (or one skipped record) of a kind's stream, with its provenance.

  example:   the dict from make_example, or None when the record was skipped
  skip:      the SKIP_REASONS entry when skipped, else None
  record_id: index of the record within its source (before sharding)
  source_id: index of the source within the kind
  image_id:  `features.record_image_id` of the record (image and video kinds), else -1
  """

  example: dict | None
  skip: str | None
  record_id: int
  source_id: int
  image_id: int = -1


@functools.lru_cache(maxsize=64)
def example_spec(kind: str, sizes: F.BatchSizes) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Per-example field -> (shape, dtype) expected from make_example (batch axis removed).

  For the region kind the per-text fields keep a leading axis written as -1 (n texts).
  Cached (checked for every example); treat the returned dict as read-only.
  """
  spec = F.batch_spec(sizes)[kind]
  out = {}
  for name, (shape, dtype) in spec.items():
    if name in _BOOKKEEPING:
      continue
    if kind == F.REGION and name not in _REGION_IMAGE_FIELDS:
      out[name] = ((-1,) + shape[1:], dtype)
    else:
      out[name] = (shape[1:], dtype)
  return out


def check_example(
  kind: str, example: dict, sizes: F.BatchSizes, where: str, max_regions: int | None = None
) -> int:
  """Validates one example against `example_spec`; returns its number of texts (1 if not region).

  Raises ValueError naming `where` (the record) and the offending field, so a transform bug never
  surfaces as a shape error deep inside np.stack or XLA.
  """
  spec = example_spec(kind, sizes)
  if not isinstance(example, dict):
    raise ValueError(f"{where}: make_example returned {type(example).__name__}, expected dict")
  missing, extra = set(spec) - set(example), set(example) - set(spec)
  if missing or extra:
    raise ValueError(
      f"{where}: {kind} example fields missing {sorted(missing)}, unexpected {sorted(extra)}"
    )
  n = None
  for name, (shape, dtype) in spec.items():
    arr = np.asarray(example[name])
    if arr.dtype != dtype:
      raise ValueError(f"{where}: field {name!r} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if len(arr.shape) != len(shape) or any(s not in (-1, a) for s, a in zip(shape, arr.shape)):
      raise ValueError(f"{where}: field {name!r} has shape {arr.shape}, expected {shape}")
    if shape and shape[0] == -1:
      if n is None:
        n = arr.shape[0]
      elif arr.shape[0] != n:
        raise ValueError(f"{where}: field {name!r} has {arr.shape[0]} texts, other fields have {n}")
  if n is None:
    return 1
  if n < 1 or (max_regions is not None and n > max_regions):
    raise ValueError(f"{where}: region example has {n} texts, expected 1..{max_regions}")
  return n


def _zeros(spec) -> dict[str, np.ndarray]:
  return {name: np.zeros(shape, dtype) for name, (shape, dtype) in spec.items()}


def pack_rows(kind: str, items: Sequence[Tagged], sizes: F.BatchSizes) -> dict[str, np.ndarray]:
  """Image or video sub-batch: one row per example, padded to the kind's batch size."""
  spec = F.batch_spec(sizes)[kind]
  b = spec[F.VALID][0][0]
  if len(items) > b:
    raise ValueError(f"{kind}: {len(items)} examples for a sub-batch of {b}")
  out = _zeros(spec)
  out[F.RECORD_ID][:] = -1
  out[F.SOURCE_ID][:] = -1
  out[F.IMAGE_ID][:] = -1
  for row, item in enumerate(items):
    for name, value in item.example.items():
      out[name][row] = value
    out[F.VALID][row] = 1
    out[F.RECORD_ID][row] = item.record_id
    out[F.SOURCE_ID][row] = item.source_id
    out[F.IMAGE_ID][row] = item.image_id
  return out


def region_text_selection(
  num_texts: int, batch: int, rng: np.random.Generator, full: bool
) -> np.ndarray:
  """Which flattened texts fill the `batch` text rows (docs/fidelity.md#region-batch-collation).

  Enough texts: a random sample without replacement (in sampled order, as random.sample gives).
  Too few texts in a full loader batch: all texts, then padding with duplicates, as the official
  collate does: a random sample (without replacement) of the existing texts is appended, and
  this expansion repeats while the batch is still short. A partial loader batch (the stream ran
  out) is never padded with duplicates: its missing rows become valid = 0 padding instead, so a
  finite pass counts every text once.

  Returns int [k] indices into the flattened texts, k <= batch (k < batch only when not full).
  """
  if num_texts >= batch:
    return rng.choice(num_texts, size=batch, replace=False)
  sel = np.arange(num_texts)
  if not full or num_texts == 0:
    return sel
  while len(sel) < batch:
    need = batch - len(sel)
    sel = np.concatenate([sel, rng.choice(num_texts, size=min(need, num_texts), replace=False)])
  return sel


def pack_region(
  items: Sequence[Tagged], sizes: F.BatchSizes, rng: np.random.Generator, full: bool
) -> dict[str, np.ndarray]:
  """Region sub-batch from one loader batch of up to region_max_images examples.

  Image slot j holds example j's image (image_valid = 1) even when none of its texts survives
  the text sampling, as in the official collate. image_index maps every text row to its slot.
  """
  spec = F.batch_spec(sizes)[F.REGION]
  b, n_img = sizes.region_batch, sizes.region_max_images
  if len(items) > n_img:
    raise ValueError(f"region: {len(items)} examples for {n_img} image slots")
  out = _zeros(spec)
  out[F.RECORD_ID][:] = -1
  out[F.SOURCE_ID][:] = -1
  text_fields = [k for k in example_spec(F.REGION, sizes) if k not in _REGION_IMAGE_FIELDS]
  slots, texts = [], []  # per flattened text: its image slot, and (item, row within item)
  for j, item in enumerate(items):
    out[F.PIXELS][j] = item.example[F.PIXELS]
    out[F.IMAGE_VALID][j] = 1
    n = item.example[F.IS_IMAGE].shape[0]
    slots.extend([j] * n)
    texts.extend((item, t) for t in range(n))
  sel = region_text_selection(len(texts), b, rng, full)
  for row, k in enumerate(sel):
    item, t = texts[k]
    for name in text_fields:
      out[name][row] = item.example[name][t]
    out[F.IMAGE_INDEX][row] = slots[k]
    out[F.VALID][row] = 1
    out[F.RECORD_ID][row] = item.record_id
    out[F.SOURCE_ID][row] = item.source_id
  return out


# ----------------------------------------------------------------------------------------------
# The packing transform: a grain IterDataset over a MapDataset stream of `Tagged` elements.
# ----------------------------------------------------------------------------------------------


def _pack_seed(seed_key: Sequence[int], batch_index: int) -> np.random.Generator:
  # Tag 1 keeps the packing randomness apart from the per-example seeds (tag 0, in mixture.py).
  return np.random.default_rng([*seed_key, 1, batch_index])


class PackIterDataset(grain.IterDataset):
  """Packs a kind's stream of `Tagged` examples into fixed-shape sub-batches.

  The stream is a MapDataset whose element i is a pure function of i (record choice, shuffling
  and the per-example seed all derive from the index), so this transform's state is just the
  next stream index plus the sub-batch counter. Restoring rebuilds the reader at that index,
  which makes the state independent of the number of worker processes: worker processes only
  run the per-example map (`mp_prefetch` slices the stream round-robin and the interleave
  returns elements in stream order), while skipping and packing happen here, in the consuming
  process, where the skip counters live.

  Each element of this dataset is one sub-batch dict (features.batch_spec(sizes)[kind]).
  """

  def __init__(
    self,
    stream: grain.MapDataset,
    kind: str,
    sizes: F.BatchSizes,
    *,
    seed_key: Sequence[int],
    max_regions: int | None = None,
    num_workers: int = 0,
    worker_buffer_size: int = 4,
    read_threads: int = 1,
    read_buffer_size: int = 8,
    worker_init_fn=None,
  ):
    """
    Args:
      stream: MapDataset of `Tagged` (infinite, or finite for a number of epochs).
      kind: one of features.KINDS with a non-zero batch size in `sizes`.
      seed_key: ints that seed the region text sampling together with the sub-batch index.
      max_regions: upper bound on texts per region example (validated).
      num_workers: worker processes running the per-example map (0: in this process).
      worker_buffer_size: examples each worker may prepare ahead.
      read_threads / read_buffer_size: grain ReadOptions of the per-example map.
      worker_init_fn: (worker_index, worker_count) -> None, run in each worker at start.
    """
    super().__init__(stream)
    if kind not in F.KINDS:
      raise ValueError(f"unknown kind {kind!r}; expected one of {F.KINDS}")
    if kind not in F.batch_spec(sizes):
      raise ValueError(f"kind {kind!r} has batch size 0 in {sizes}")
    self.stream, self.kind, self.sizes = stream, kind, sizes
    self.seed_key = tuple(int(s) for s in seed_key)
    self.max_regions = max_regions
    self.num_workers, self.worker_buffer_size = num_workers, worker_buffer_size
    self.read_threads, self.read_buffer_size = read_threads, read_buffer_size
    self.worker_init_fn = worker_init_fn

  @property
  def examples_per_batch(self) -> int:
    """Examples (records) consumed per sub-batch: texts for image/video, images for regions."""
    if self.kind == F.IMAGE:
      return self.sizes.image_batch
    if self.kind == F.VIDEO:
      return self.sizes.video_batch
    return self.sizes.region_max_images

  def reader(self, start: int) -> grain.DatasetIterator:
    """An iterator over stream[start:], with the per-example map in worker processes if any."""
    ds = self.stream[start:].to_iter_dataset(
      grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=self.read_buffer_size)
    )
    if self.num_workers > 0:
      workers.ensure_absl_flags_parsed()
      ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=self.worker_buffer_size
        ),
        worker_init_fn=self.worker_init_fn,
      )
    return iter(ds)

  def __iter__(self) -> "PackIterator":
    return PackIterator(self)

  def __str__(self) -> str:
    return f"PackIterDataset(kind={self.kind}, workers={self.num_workers})"


class PositionIterator(grain.DatasetIterator):
  """The resumable core of our batch iterators (PackIterator, mvptr_stream.MvptrIterator): the
  next stream position, batches produced, end of stream and skip counts, which are the whole
  JSON state, and the reader (threads / worker processes) reopened from the position."""

  def __init__(self):
    super().__init__()
    self._reader = None
    self._position = 0
    self._batch_index = 0
    self._exhausted = False
    self._skips: dict[str, int] = {}

  def skip_counts(self) -> dict[str, int]:
    """Records dropped so far, per skip reason (only reasons that occurred)."""
    return dict(self._skips)

  def _counters(self) -> dict:
    return {
      "position": int(self._position),
      "batch_index": int(self._batch_index),
      "exhausted": bool(self._exhausted),
      "skips": dict(sorted(self._skips.items())),
    }

  def _restore_counters(self, state: dict, who: str) -> None:
    """Checks the skip reasons of a saved state, closes the reader and takes the counters."""
    unknown = set(state["skips"]) - set(F.SKIP_REASONS)
    if unknown:
      raise ValueError(f"{who} has unknown skip reasons {sorted(unknown)}")
    self._close_reader()
    self._position = int(state["position"])
    self._batch_index = int(state["batch_index"])
    self._exhausted = bool(state["exhausted"])
    self._skips = {str(k): int(v) for k, v in state["skips"].items()}

  def _close_reader(self) -> None:
    if self._reader is not None:
      self._reader.close()
      self._reader = None

  def close(self) -> None:
    """Stops the read threads and worker processes (idempotent)."""
    self._close_reader()
    super().close()


class PackIterator(PositionIterator):
  """Iterator of `PackIterDataset`; its state is JSON-serialisable and worker-count independent.

  state = {'position': next stream index, 'batch_index': sub-batches produced,
           'exhausted': the stream has ended, 'skips': {reason: n} accumulated so far}
  """

  def __init__(self, ds: PackIterDataset):
    super().__init__()
    self._ds = ds

  # -- reading ---------------------------------------------------------------------------------

  def _next_tagged(self) -> Tagged | None:
    """Next stream element, or None at the end of the stream."""
    if self._exhausted:
      return None
    if self._reader is None:
      self._reader = self._ds.reader(self._position)
    try:
      item = next(self._reader)
    except StopIteration:
      self._exhausted = True
      self._close_reader()
      return None
    self._position += 1
    return item

  def _collect(self) -> list[Tagged]:
    """Up to examples_per_batch usable examples; skipped records are counted and dropped."""
    ds, items = self._ds, []
    while len(items) < ds.examples_per_batch:
      item = self._next_tagged()
      if item is None:
        break
      if item.skip is not None:
        self._skips[item.skip] = self._skips.get(item.skip, 0) + 1
        continue
      where = f"{ds.kind} source {item.source_id} record {item.record_id}"
      check_example(ds.kind, item.example, ds.sizes, where, ds.max_regions)
      items.append(item)
    return items

  def __next__(self) -> dict[str, np.ndarray]:
    ds = self._ds
    items = self._collect()
    if not items:
      raise StopIteration
    full = len(items) == ds.examples_per_batch
    if ds.kind == F.REGION:
      batch = pack_region(items, ds.sizes, _pack_seed(ds.seed_key, self._batch_index), full)
    else:
      batch = pack_rows(ds.kind, items, ds.sizes)
    self._batch_index += 1
    return batch

  # -- state -----------------------------------------------------------------------------------

  def get_state(self) -> dict:
    return self._counters()

  def set_state(self, state: dict) -> None:
    keys = {"position", "batch_index", "exhausted", "skips"}
    if set(state) != keys:
      raise ValueError(
        f"{self._ds.kind}: iterator state has keys {sorted(state)}, expected {sorted(keys)}"
      )
    self._restore_counters(state, f"{self._ds.kind}: iterator state")

  def __str__(self) -> str:
    return f"PackIterator(kind={self._ds.kind}, position={self._position})"
