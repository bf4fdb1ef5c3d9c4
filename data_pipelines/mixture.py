"""Per-kind grain pipelines and their iterator, one kind's `MixedBatch` dict per step.

Per kind (image, region, video), records flow as

  each source: range(len) → host shard [i::n] → shuffle(seed) → repeat(epochs) → (source, index)
  sources of the kind: MapDataset.mix(weights)       (unshuffled: concatenate)
  → map_with_index: read the record + make_example with a per-example seed
      np.random.default_rng([seed, shard_index, kind, 0, position])
    a SkipRecord (from the reader or the transform) becomes a `Tagged` skip marker, not an error
  → PackIterDataset (packing.py): per-example map in worker processes (mp_prefetch), skipping,
    counting and packing into fixed-shape sub-batches in the consuming process.

Every element of the per-kind stream is a pure function of its position, so a pipeline's state
is just positions and counters: `MixedBatchIterator.get_state()` is a small JSON-able dict, and
restoring it (with any number of worker processes) reproduces the remaining batches bit for bit.

Host sharding follows the official reader in spirit (each rank reads a disjoint part of the
data) but shards records, not files, so the shards stay balanced for any file layout
(docs/fidelity.md#data-files-and-reading; source weights: docs/fidelity.md#source-mixing).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from data_pipelines import features as F
from data_pipelines import packing, workers
from data_pipelines.source_specs import build_source

STATE_VERSION = 1
_EXAMPLE_TAG = 0  # seed tag of per-example randomness (packing uses tag 1)


def seed32(*ints: int) -> int:
  """A well-mixed 32-bit seed from several integers (grain shuffle seeds must fit in uint32)."""
  return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1)[0])


def _tag_source(source_id: int, record_index: int) -> tuple[int, int]:
  return source_id, int(record_index)


def source_indices(
  num_records: int,
  source_id: int,
  *,
  shard_index: int,
  shard_count: int,
  shuffle_seed: int | None,
  num_epochs: int | None,
) -> grain.MapDataset:
  """MapDataset of (source_id, record_index) for this host's shard of one source.

  Shards are strided ([shard_index::shard_count]) so they are disjoint, cover the source, and
  differ in size by at most one record. Shuffling happens after sharding and is re-seeded every
  epoch by grain's repeat.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  ds = grain.MapDataset.range(num_records)[shard_index::shard_count]
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  if num_epochs != 1:
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    if len(ds) == 0:
      raise ValueError(
        f"source {source_id}: shard {shard_index}/{shard_count} is empty; cannot repeat it"
      )
    ds = ds.repeat(num_epochs)
  return ds.map(functools.partial(_tag_source, source_id))


class ExampleFn:
  """Reads one record and runs make_example on it; a SkipRecord becomes a skip marker.

  Picklable (sources, tokenizer and make_example travel to the worker processes).
  """

  def __init__(
    self,
    kind: str,
    sources: Sequence[Any],
    make_example: Callable,
    preproc: F.PreprocConfig,
    tokenizer,
    seed_key: Sequence[int],
  ):
    self.kind, self.sources, self.make_example = kind, list(sources), make_example
    self.preproc, self.tokenizer, self.seed_key = preproc, tokenizer, tuple(seed_key)

  def __call__(self, position: int, tagged: tuple[int, int]) -> packing.Tagged:
    source_id, record_index = tagged
    where = f"{self.kind} source {source_id} record {record_index}"
    try:
      record = self.sources[source_id][record_index]
    except F.SkipRecord as e:
      return packing.Tagged(None, e.reason, record_index, source_id)
    if isinstance(record, Mapping) and record.get("kind", self.kind) != self.kind:
      raise ValueError(f"{where}: record of kind {record.get('kind')!r} in a {self.kind} source")
    rng = np.random.default_rng([*self.seed_key, _EXAMPLE_TAG, int(position)])
    try:
      example = self.make_example(self.kind, record, rng, self.preproc, self.tokenizer)
    except F.SkipRecord as e:
      return packing.Tagged(None, e.reason, record_index, source_id)
    except Exception as e:  # a bug or a bad config, not bad data: fail loudly, naming the record
      rid = record.get("id", "?") if isinstance(record, Mapping) else "?"
      raise RuntimeError(f"{where} (id {rid}): make_example failed: {type(e).__name__}: {e}") from e
    image_id = -1
    if self.kind != F.REGION and isinstance(record, Mapping):
      image_id = F.record_image_id(record)
    return packing.Tagged(example, None, record_index, source_id, image_id)


def _kind_id(kind: str) -> int:
  return F.KINDS.index(kind)


def kind_dataset(
  kind: str,
  sources: Sequence[Any],
  sizes: F.BatchSizes,
  preproc: F.PreprocConfig,
  tokenizer,
  *,
  seed: int,
  weights: Sequence[float] | None = None,
  make_example: Callable | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
  num_epochs: int | None = None,
  shuffle: bool = True,
  num_workers: int = 0,
  worker_buffer_size: int = 4,
  read_threads: int = 1,
  exit_with_parent: bool = True,
) -> packing.PackIterDataset:
  """One kind's pipeline: sources → shard → shuffle → repeat → mix → make_example → pack.

  Args:
    sources: random-access sources (len + getitem) of canonical records of this kind.
    weights: mixture weights, one per source (default uniform). With finite epochs the mixture
      ends when its first source ends (grain's mix semantics); without shuffle the sources are
      concatenated instead and weights are ignored.
    make_example: (kind, record, rng, preproc, tokenizer) -> dict; default examples.make_example.
    num_epochs: None repeats forever; n > 0 gives a finite stream.
    shuffle: False keeps record order.
    exit_with_parent: install the worker hook that ends workers when this process dies.
  """
  if not sources:
    raise ValueError(f"{kind}: no sources configured")
  if int(seed) < 0:
    raise ValueError(f"{kind}: seed must be >= 0, got {seed}")
  if make_example is None:
    from data_pipelines.examples import make_example  # pylint: disable=g-import-not-at-top
  if weights is None:
    weights = [1.0] * len(sources)
  weights = [float(w) for w in weights]
  if len(weights) != len(sources) or any(not w > 0 for w in weights):
    raise ValueError(
      f"{kind}: need one positive weight per source, got {weights} for {len(sources)} sources"
    )
  kind_id = _kind_id(kind)
  streams = [
    source_indices(
      len(src),
      i,
      shard_index=shard_index,
      shard_count=shard_count,
      shuffle_seed=seed32(seed, kind_id, i) if shuffle else None,
      num_epochs=num_epochs,
    )
    for i, src in enumerate(sources)
  ]
  if len(streams) == 1:
    stream = streams[0]
  elif shuffle:
    stream = grain.MapDataset.mix(streams, weights)
  else:
    stream = grain.MapDataset.concatenate(streams)
  seed_key = (int(seed), int(shard_index), kind_id)
  stream = stream.map_with_index(
    ExampleFn(kind, sources, make_example, preproc, tokenizer, seed_key)
  )
  return packing.PackIterDataset(
    stream,
    kind,
    sizes,
    seed_key=seed_key,
    max_regions=preproc.max_regions,
    num_workers=num_workers,
    worker_buffer_size=worker_buffer_size,
    read_threads=read_threads,
    worker_init_fn=workers.worker_init_fn() if (exit_with_parent and num_workers) else None,
  )


class MixedBatchIterator(grain.DatasetIterator):
  """One kind's pipeline as MixedBatch dicts: each step is {kind: {field: np.ndarray}}.

  The sub-batch matches features.batch_spec. Training builds one iterator per kind and stream
  and merges their dicts (x2vlm_jax/train_data.py). Ends when a finite stream ends. The state
  is a JSON-serialisable dict {kind: {...}} (an entry of the `data_iter` of
  x2vlm_jax.checkpoint), also usable through grain's orbax save/load of a DatasetIterator.
  """

  def __init__(self, dataset: packing.PackIterDataset):
    self._kind = dataset.kind
    self._iter = iter(dataset)
    super().__init__(self._iter)

  @property
  def kind(self) -> str:
    return self._kind

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    self._assert_not_closed()
    return {self._kind: next(self._iter)}

  def skip_counts(self) -> dict[str, dict[str, int]]:
    """{kind: {reason: records dropped so far}} (reasons with zero counts are omitted)."""
    return {self._kind: self._iter.skip_counts()}

  def get_state(self) -> dict:
    """{kind: {'version', 'position', 'batch_index', 'exhausted', 'skips'}} (JSON-able)."""
    return {self._kind: {"version": STATE_VERSION, **self._iter.get_state()}}

  def set_state(self, state: dict) -> None:
    if set(state) != {self._kind}:
      raise ValueError(
        f"data iterator state has kinds {sorted(state)}, this pipeline has {[self._kind]}"
      )
    kind_state = dict(state[self._kind])
    version = kind_state.pop("version", None)
    if version != STATE_VERSION:
      raise ValueError(
        f"{self._kind}: data iterator state version {version!r}, expected {STATE_VERSION}"
      )
    self._iter.set_state(kind_state)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __str__(self) -> str:
    return f"MixedBatchIterator(kind={self._kind})"


# ----------------------------------------------------------------------------------------------
# Config-driven construction (used by the trainer and the evaluators).
# ----------------------------------------------------------------------------------------------

_BATCH_ATTR = {F.IMAGE: "image_batch", F.REGION: "region_batch", F.VIDEO: "video_batch"}


def _as_dict(cfg) -> dict:
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
    return cfg.to_dict()
  return dict(cfg)


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


def _kind_sources(data_cfg, kind) -> list[dict]:
  entries = data_cfg.get(kind) or []
  if isinstance(entries, Mapping):  # a single source given without a list
    entries = [entries]
  return [_as_dict(e) for e in entries]


def _pipeline_options(data_cfg, kind: str) -> dict:
  workers_cfg = data_cfg.get("num_workers", 0)
  if isinstance(workers_cfg, Mapping):  # per kind, e.g. {'image': 6, 'region': 3}
    workers_cfg = workers_cfg.get(kind, 0)
  return dict(
    num_workers=int(workers_cfg),
    worker_buffer_size=int(data_cfg.get("worker_buffer_size", 4)),
    read_threads=int(data_cfg.get("read_threads", 1)),
  )


def _configured_kinds(data_cfg, sizes: F.BatchSizes) -> dict[str, list[dict]]:
  """kind -> source specs, for the kinds with a non-zero batch size; checks both agree."""
  out = {}
  for kind in F.KINDS:
    specs = _kind_sources(data_cfg, kind)
    if getattr(sizes, _BATCH_ATTR[kind]):
      if not specs:
        raise ValueError(
          f"{kind}: batch size {getattr(sizes, _BATCH_ATTR[kind])} but no "
          f"sources under data_cfg[{kind!r}]"
        )
      out[kind] = specs
  if F.REGION in out and not sizes.region_max_images:
    raise ValueError("region: region_batch > 0 needs region_max_images > 0")
  return out


def make_train_iterator(
  data_cfg,
  sizes: F.BatchSizes,
  preproc: F.PreprocConfig,
  tokenizer,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  *,
  make_example=None,
  source_factory=build_source,
) -> MixedBatchIterator:
  """One kind's training stream: shuffled, repeated (data_cfg['num_epochs'], default forever).

  sizes: host-local (per process) batch sizes with exactly one non-zero kind: the kind streamed.
  data_cfg: mapping with that kind's list of sources, data_cfg[kind], each
    {'type': 'jsonl' | 'json' | 'refcoco' | 'arrayrecord' | 'synthetic', 'path': ...,
    'weight': 1.0, key names...} (`source_specs.build_source`);
    optional 'num_workers' (worker processes: an int, or {kind: int}), 'worker_buffer_size',
    'read_threads', 'num_epochs'.
  process_index/count default to JAX's.
  """
  data_cfg = _as_dict(data_cfg)
  index, count = _process(process_index, process_count)
  kinds = _configured_kinds(data_cfg, sizes)
  if len(kinds) != 1:
    raise ValueError(
      f"a training iterator streams one kind, {sizes} gives {sorted(kinds)}; "
      "build one iterator per kind"
    )
  ((kind, specs),) = kinds.items()
  return MixedBatchIterator(
    kind_dataset(
      kind,
      [source_factory(kind, s) for s in specs],
      sizes,
      preproc,
      tokenizer,
      seed=seed,
      weights=[float(s.get("weight", 1.0)) for s in specs],
      make_example=make_example,
      shard_index=index,
      shard_count=count,
      num_epochs=data_cfg.get("num_epochs"),
      shuffle=True,
      **_pipeline_options(data_cfg, kind),
    )
  )
