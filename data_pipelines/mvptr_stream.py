"""The MVPTR pre-training stream: a grain pipeline of fixed-shape batches from a record source.

  range(len(source)) -> process shard [process_index::process_count] -> shuffle(seed, per epoch)
  -> repeat(num_epochs) -> map_with_index: read the record, `build_example` with
     np.random.default_rng([seed, process_index, position])   (position in this stream)
  -> skip, count and stack `batch_size` examples (here, in the consuming process)

Every stream element is a pure function of its position, so the iterator's state is the next
position, the batch counter and the skip counters (a small JSON-able dict): restoring it
reproduces the remaining batches bit for bit (the design of `mixture.py` / `packing.py`).
A record whose reader raises `SkipRecord` is dropped, counted per reason (`skip_counts()`) and
logged with its record id and field (the first 100 skips, then at 1000, 10000, ...). A finite
stream (num_epochs) drops its last partial batch, so every batch has the same shapes. Reading
runs in grain read threads, and optionally in worker processes (`num_workers`; the state does
not depend on it).

The source is any random-access source of MVPTR records (`mvptr_oscar.OscarSource`): dicts with
words / phrases / tags int32, regions float32 [n, D], image_id int64. A batch holds every
`mvptr_examples.build_example` field stacked on a leading [B] axis, plus `image_id` int64 [B].
"""

from __future__ import annotations

import dataclasses
import logging

import grain
import numpy as np

from data_pipelines import features as F
from data_pipelines import packing, workers
from data_pipelines.mixture import seed32
from data_pipelines.mvptr_examples import MvptrExampleSpec, build_example

STATE_VERSION = 1
IMAGE_ID = "image_id"
_log = logging.getLogger(__name__)


def _log_skip(skip: tuple[str, str, str, str], total: int) -> None:
  """Logs a skip (record, reason, field, detail): the first 100, then one in each power of ten,
  so a badly broken data set cannot flood the log."""
  if total <= 100 or str(total).rstrip("0") == "1":
    reason, rid, field, detail = skip
    _log.warning(
      "skipped %s: %s in field %r: %s (%d skipped so far)", rid, reason, field, detail, total
    )


class ExampleFn:
  """Reads record `index` and builds its example; a SkipRecord becomes ('skip', (reason,
  record id, field, detail)) -- plain strings, which travel from worker processes (the
  exception itself does not pickle)."""

  def __init__(self, source, spec: MvptrExampleSpec, seed: int, process_index: int, build=None):
    self.source, self.spec, self.seed_key = source, spec, (int(seed), int(process_index))
    self.build = build  # None: `build_example` of the record's parts

  def __call__(self, position: int, index: int):
    try:
      record = self.source[int(index)]
    except F.SkipRecord as e:
      return ("skip", (e.reason, e.record_id, e.field, e.detail))
    rng = np.random.default_rng([*self.seed_key, int(position)])
    try:
      if self.build is not None:
        example = self.build(rng, record, self.spec)
      else:
        example = build_example(
          rng, record["words"], record["phrases"], record["tags"], record["regions"], self.spec
        )
    except Exception as e:  # a config / code problem, not bad data: fail naming the record
      rid = record.get("id", f"record {index}")
      raise RuntimeError(f"{rid}: build_example failed: {type(e).__name__}: {e}") from e
    example[IMAGE_ID] = np.int64(record["image_id"])
    return ("ok", example)


def example_stream(
  source, spec, seed, process_index, process_count, num_epochs=None, shuffle=True, build=None
) -> grain.MapDataset:
  """MapDataset whose element i is ('ok', example) or ('skip', (reason, record id, field,
  detail)) (module docstring); `build(rng, record, spec)` replaces `build_example` (the
  fine-tuning rows of `mvptr_finetune_examples.task_row`)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if int(seed) < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  ds = grain.MapDataset.range(len(source))[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"process {process_index}/{process_count}: no records in its shard")
  if shuffle:  # tag 15: apart from the X2-VLM kinds' seed32(seed, kind, source) shuffles
    ds = ds.shuffle(seed=seed32(seed, 15))
  if num_epochs != 1:
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    ds = ds.repeat(num_epochs)
  return ds.map_with_index(ExampleFn(source, spec, seed, process_index, build))


class MvptrIterator(packing.PositionIterator):
  """Batches of MVPTR pre-training examples; `get_state()` / `set_state()` resume exactly.

  state = {'version', 'position' (next stream element), 'batch_index', 'exhausted',
           'skips' {reason: n}, 'config' (seed, batch size, shard, records: must match)}
  """

  def __init__(
    self, stream: grain.MapDataset, batch_size: int, config: dict, read_threads=1, num_workers=0
  ):
    super().__init__()
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self._stream, self._batch_size, self._config = stream, int(batch_size), dict(config)
    self._read_threads, self._num_workers = int(read_threads), int(num_workers)

  def _next_element(self):
    if self._exhausted:
      return None
    if self._reader is None:
      self._reader = self._open_reader()
    try:
      item = next(self._reader)
    except StopIteration:
      self._exhausted = True
      self._close_reader()
      return None
    self._position += 1
    return item

  def _open_reader(self):
    """stream[position:], the per-example map in read threads and, with num_workers > 0, in
    worker processes (grain's mp_prefetch keeps the stream order, so the state is the same)."""
    options = grain.ReadOptions(num_threads=self._read_threads, prefetch_buffer_size=8)
    ds = self._stream[self._position :].to_iter_dataset(options)
    if self._num_workers > 0:
      workers.ensure_absl_flags_parsed()
      ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=self._num_workers, per_worker_buffer_size=4),
        worker_init_fn=workers.worker_init_fn(),
      )
    return iter(ds)

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    examples = []
    while len(examples) < self._batch_size:
      item = self._next_element()
      if item is None:
        raise StopIteration  # a finite stream's last partial batch is dropped
      status, value = item
      if status == "skip":
        self._skips[value[0]] = self._skips.get(value[0], 0) + 1
        _log_skip(value, sum(self._skips.values()))
        continue
      examples.append(value)
    self._batch_index += 1
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, **self._counters(), "config": dict(self._config)}

  def set_state(self, state: dict) -> None:
    keys = {"version", "position", "batch_index", "exhausted", "skips", "config"}
    if set(state) != keys or state["version"] != STATE_VERSION:
      raise ValueError(
        f"MVPTR iterator state has keys {sorted(state)}, expected {sorted(keys)}"
        f" (version {STATE_VERSION})"
      )
    if dict(state["config"]) != self._config:
      raise ValueError(f"MVPTR iterator state is for {state['config']}, this one {self._config}")
    self._restore_counters(state, "MVPTR iterator state")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def pretrain_iterator(
  source,
  spec: MvptrExampleSpec,
  batch_size: int,
  seed: int,
  process_index: int,
  process_count: int,
  num_epochs: int | None = None,
  *,
  shuffle: bool = True,
  read_threads: int = 1,
  num_workers: int = 0,
  build=None,
) -> MvptrIterator:
  """This process's stream of pre-training batches (module docstring): a dict of every
  `build_example` field with a leading [batch_size] axis, plus image_id int64 [batch_size].
  num_epochs None repeats forever; shuffle False keeps the shard's record order; num_workers > 0
  runs the reading and `build_example` in that many worker processes (the source must pickle;
  scripts keep their top level under `if __name__ == "__main__":`, `workers.py`); `build` as
  `example_stream`."""
  stream = example_stream(
    source, spec, seed, process_index, process_count, num_epochs, shuffle, build
  )
  config = {
    "seed": int(seed),
    "batch_size": int(batch_size),
    "process_index": int(process_index),
    "process_count": int(process_count),
    "records": len(source),
    "num_epochs": num_epochs,
    "shuffle": bool(shuffle),
  }
  return MvptrIterator(stream, batch_size, config, read_threads, num_workers)


def heldout_arrays(
  source, spec: MvptrExampleSpec, build=None
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Every record of a (small, held-out) source in order, unmasked (all masking rates 0), as
  stacked `build_example` fields + image_id int64 [N] and record index int64 [N] ('index');
  with the skip counts of the records left out. For retrieval evaluation: captions of one image
  share its image_id. `build` as `example_stream`."""
  plain = dataclasses.replace(spec, word_rate=0.0, tag_rate=0.0, phrase_rate=0.0)
  rows, skips, fn = [], {}, ExampleFn(source, plain, 0, 0, build)
  for i in range(len(source)):
    status, value = fn(i, i)
    if status == "skip":
      skips[value[0]] = skips.get(value[0], 0) + 1
      _log_skip(value, sum(skips.values()))
      continue
    value["index"] = np.int64(i)
    rows.append(value)
  if not rows:
    raise ValueError(f"{source!r}: no readable record")
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, skips
