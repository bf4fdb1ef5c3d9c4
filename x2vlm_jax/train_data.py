"""The trainer's data side: the main and aux streams of every kind and their state.

Streams. Each configured kind has its own main iterator (`data.<kind>` sources); a kind with
`data.aux.<kind>` sources and `loss.aux_iter_perc[kind]` = p > 0 also has an aux iterator. Every
step a coin, a pure function of (seed, step, kind), picks the aux stream with probability p
(docs/fidelity.md#aux-streams: 1B stage 1 takes its image batch from the clean aux data on 15 %
of the steps; stage 2 its video batch from WebVid on 35 %). Only the chosen stream is advanced.

Difference from the official code: on an aux image step the official loop has already drawn a
batch from the main (LAION) loader and throws it away (docs/fidelity.md#aux-streams); we leave
the main stream where it is, so no main-stream data is wasted. The batches a step trains on
follow the same distribution; the official run just moves through LAION 1/0.85 times faster.

MVPTR runs (`model.family = 'mvptr'`) read one stream of region-feature batches instead,
`MvptrStreams` (the same interface: `next`, state, skip counts, close; docs/mvptr.md#training).

State. Every stream's state is a small JSON dict (data_pipelines/mixture.py). With several
processes each has its own; `gather_process_states` collects all of them (to be saved by the
checkpoint) and each process restores its own entry.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from data_pipelines import features as F
from data_pipelines import mixture

_COIN_TAG = 0xA0C5  # separates the aux coin from every other use of the seed


@dataclasses.dataclass(frozen=True)
class StreamsConfig:
  """The data streams of a run (built from the config by `run_config.streams_config`).

  Attributes:
    sources: kind -> the main stream's source entries (`mixture.build_source` dicts).
    aux_sources: kind -> the aux stream's source entries (kinds with an aux stream only).
    aux_prob: kind -> probability that a step takes that kind from its aux stream.
    options: reader options (num_workers, worker_buffer_size, read_threads).
  """

  sources: Mapping[str, tuple]
  aux_sources: Mapping[str, tuple]
  aux_prob: Mapping[str, float]
  options: Mapping[str, int]


def _only(sizes: F.BatchSizes, kind: str) -> F.BatchSizes:
  """`sizes` with every other kind's batch set to 0."""
  keep = {
    F.IMAGE: ("image_batch",),
    F.REGION: ("region_batch", "region_max_images"),
    F.VIDEO: ("video_batch",),
  }[kind]
  zero = {
    f: 0
    for f in ("image_batch", "region_batch", "region_max_images", "video_batch")
    if f not in keep
  }
  return F.BatchSizes(**{**sizes.__dict__, **zero})


class DataStreams:
  """Main and aux iterators per kind; `next(step)` returns that step's host-local MixedBatch.

  Args:
    cfg: the streams' sources and aux probabilities.
    sizes: per-process batch sizes (a kind of size 0 gets no stream).
    preproc, tokenizer: per-example preprocessing.
    seed: the run seed (shuffling, augmentation, the aux coin).
    process_index, process_count: this process's data shard.
  """

  def __init__(
    self,
    cfg: StreamsConfig,
    sizes: F.BatchSizes,
    preproc: F.PreprocConfig,
    tokenizer,
    seed: int,
    process_index: int,
    process_count: int,
    *,
    make_example=None,
  ):
    self.seed = int(seed)
    self.sizes = sizes
    spec = F.batch_spec(sizes)
    self.kinds = tuple(k for k in F.KINDS if k in spec)
    self.aux_prob = {k: p for k, p in cfg.aux_prob.items() if k in self.kinds}
    common = dict(cfg.options, num_epochs=None)
    self._streams: dict[str, mixture.MixedBatchIterator] = {}
    for kind in self.kinds:
      for stream, sources, seed_offset in (
        ("main", cfg.sources.get(kind, ()), 0),
        ("aux", cfg.aux_sources.get(kind, ()), 1),
      ):
        if stream == "aux" and kind not in self.aux_prob:
          continue
        data_cfg = {**common, kind: [dict(s) for s in sources]}
        # The aux stream gets its own seed so its shuffles and augmentations are not those of
        # the main stream at the same positions.
        self._streams[f"{stream}/{kind}"] = mixture.make_train_iterator(
          data_cfg,
          _only(sizes, kind),
          preproc,
          tokenizer,
          mixture.seed32(self.seed, seed_offset) if seed_offset else self.seed,
          process_index,
          process_count,
          make_example=make_example,
        )

  def aux_choice(self, step: int) -> dict[str, bool]:
    """kind -> whether `step` draws that kind from its aux stream (same on every process)."""
    out = {}
    for kind, p in self.aux_prob.items():
      u = np.random.default_rng([self.seed, int(step), F.KINDS.index(kind), _COIN_TAG]).random()
      out[kind] = bool(u < p)
    return out

  def next(self, step: int) -> tuple[dict, dict[str, bool]]:
    """(host-local MixedBatch of `step`, kind -> aux chosen)."""
    choice = self.aux_choice(step)
    batch = {}
    for kind in self.kinds:
      stream = "aux" if choice.get(kind) else "main"
      batch.update(next(self._streams[f"{stream}/{kind}"]))
    return batch, choice

  def get_state(self) -> dict:
    """{'main/image': {...}, 'aux/image': {...}, ...}: JSON-able."""
    return {name: it.get_state() for name, it in self._streams.items()}

  def set_state(self, state: Mapping) -> None:
    """Restores every stream; the set of streams must match."""
    if set(state) != set(self._streams):
      raise ValueError(
        f"saved data state has streams {sorted(state)}, this run has "
        f"{sorted(self._streams)} (data sources or aux settings changed?)"
      )
    for name, it in self._streams.items():
      it.set_state(dict(state[name]))

  def skip_counts(self) -> dict[str, int]:
    """'<stream>/<kind>/<reason>' -> records skipped so far by this process."""
    out = {}
    for name, it in self._streams.items():
      for kind, reasons in it.skip_counts().items():
        for reason, n in reasons.items():
          out[f"{name.split('/')[0]}/{kind}/{reason}"] = int(n)
    return out

  def close(self) -> None:
    """Stops worker processes."""
    for it in self._streams.values():
      it.close()


@dataclasses.dataclass(frozen=True)
class MvptrStreamsConfig:
  """The MVPTR training stream (built by `run_config_mvptr.streams_config`).

  Attributes:
    spec: the example lengths, masking rates and special ids (`MvptrExampleSpec`).
    batch_size: rows per process.
    source: `spec` (the Oscar-layout dataset spec file), `data_dir`, `index_cache_dir`.
    tokenizer: directory of the captions' WordPiece tokenizer.
    options: reader options (num_workers, read_threads).
    rows: 'pretrain' (masked rows) | 'pairs' (the same stream, unmasked: the spec's rates are 0)
      | 'grounding' (one row per grounded phrase, `mvptr_grounding_stream.py`) | 'task' (VQA /
      SNLI-VE rows: `source.spec` is a task spec, `mvptr_task_sources.py`).
  """

  spec: Any
  batch_size: int
  source: Mapping[str, str]
  tokenizer: str
  options: Mapping[str, int] = dataclasses.field(default_factory=dict)
  rows: str = "pretrain"


def _oscar_iterator(cfg: MvptrStreamsConfig, seed: int, process_index: int, process_count: int):
  from data_pipelines import mvptr_oscar, mvptr_stream  # pylint: disable=g-import-not-at-top

  src = cfg.source
  if cfg.rows == "task":
    from data_pipelines import mvptr_finetune_examples as FE  # pylint: disable=g-import-not-at-top
    from data_pipelines import mvptr_task_sources as TS  # pylint: disable=g-import-not-at-top

    task = TS.TaskSource(
      src["spec"], cfg.tokenizer, cfg.spec.vocab_size, src["index_cache_dir"] or None
    )
    return mvptr_stream.pretrain_iterator(
      task,
      cfg.spec,
      cfg.batch_size,
      seed,
      process_index,
      process_count,
      **cfg.options,
      build=FE.task_row,
    )
  source = mvptr_oscar.OscarSource(
    src["spec"],
    tokenizer=cfg.tokenizer,
    index_cache_dir=src.get("index_cache_dir") or None,
    data_dir=src.get("data_dir") or None,
  )
  if cfg.rows == "grounding":
    from data_pipelines import mvptr_grounding_stream as G  # pylint: disable=g-import-not-at-top

    table, _ = G.grounding_table(source, cfg.spec)
    return G.GroundingBatches(table, cfg.batch_size, seed, process_index, process_count)
  return mvptr_stream.pretrain_iterator(
    source, cfg.spec, cfg.batch_size, seed, process_index, process_count, **cfg.options
  )


class MvptrStreams:
  """The stream of an MVPTR run, with `DataStreams`' interface: one main stream of the image
  kind whose rows are `mvptr_examples.build_example` fields (region features, tags, phrases,
  caption). Host bookkeeping as the other kinds: `record_id` = the row's image id, so
  `train.log_example_ids` works. No aux stream.

  make_iterator(cfg, seed, process_index, process_count) -> an iterator with get_state /
  set_state / skip_counts / close (default: `mvptr_stream.pretrain_iterator` over
  `mvptr_oscar.OscarSource`).
  """

  kinds = (F.IMAGE,)
  aux_prob: Mapping[str, float] = {}
  _NAME = f"main/{F.IMAGE}"

  def __init__(
    self,
    cfg: MvptrStreamsConfig,
    seed: int,
    process_index: int,
    process_count: int,
    *,
    make_iterator=None,
  ):
    self._it = (make_iterator or _oscar_iterator)(cfg, int(seed), process_index, process_count)

  def next(self, step: int) -> tuple[dict, dict[str, bool]]:
    del step  # one stream, no aux coin
    rows = dict(next(self._it))
    image_id = np.asarray(rows.pop("image_id"))
    rows.pop("id", None)
    n = image_id.shape[0]
    rows[F.RECORD_ID], rows[F.SOURCE_ID] = image_id, np.zeros(n, np.int64)
    rows[F.VALID] = np.ones(n, np.int32)
    return {F.IMAGE: rows}, {}

  def get_state(self) -> dict:
    return {self._NAME: self._it.get_state()}

  def set_state(self, state: Mapping) -> None:
    if set(state) != {self._NAME}:
      raise ValueError(f"saved data state has streams {sorted(state)}, this run has {[self._NAME]}")
    self._it.set_state(dict(state[self._NAME]))

  def skip_counts(self) -> dict[str, int]:
    """'main/image/<reason>' -> records skipped so far by this process."""
    counts = dict(self._it.skip_counts())
    if counts and all(isinstance(v, Mapping) for v in counts.values()):  # {kind: {reason: n}}
      counts = {r: n for reasons in counts.values() for r, n in reasons.items()}
    return {f"{self._NAME}/{reason}": int(n) for reason, n in counts.items()}

  def close(self) -> None:
    self._it.close()


def example_ids(batch: Mapping) -> dict[str, list[list[int]]]:
  """kind -> [[source_id, record_id], ...] of the valid rows (host-side bookkeeping fields)."""
  out = {}
  for kind, fields in batch.items():
    valid = np.asarray(fields[F.VALID]) == 1
    src, rec = np.asarray(fields[F.SOURCE_ID])[valid], np.asarray(fields[F.RECORD_ID])[valid]
    out[kind] = [[int(s), int(r)] for s, r in zip(src, rec)]
  return out


def gather_process_states(local: Mapping) -> dict:
  """{'process_<i>': state of process i} for every process (collective when multi-process)."""
  if jax.process_count() == 1:
    return {"process_0": dict(local)}
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  data = np.frombuffer(json.dumps(local, sort_keys=True).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
  width = int(np.max(lengths))
  padded = np.zeros((width,), np.uint8)
  padded[: data.size] = data
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, width)
  lengths = np.asarray(lengths).reshape(-1)
  return {
    f"process_{i}": json.loads(bytes(every[i, : lengths[i]]).decode())
    for i in range(every.shape[0])
  }
