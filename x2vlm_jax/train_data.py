"""The trainer's data side: global -> per-process batch sizes, main and aux streams, their state.

Streams. Each configured kind has its own main iterator (`data.<kind>` sources); a kind with
`data.aux.<kind>` sources and `loss.aux_iter_perc[kind]` = p > 0 also has an aux iterator. Every
step a coin, a pure function of (seed, step, kind), picks the aux stream with probability p
(reference §6.4: 1B stage 1 takes its image batch from the clean aux data on 15 % of the steps;
stage 2 its video batch from WebVid on 35 %). Only the chosen stream is advanced.

Difference from the official code: on an aux image step the official loop has already drawn a
batch from the main (LAION) loader and throws it away (§6.4 step 3, §9.29); we leave the main
stream where it is, so no main-stream data is wasted. The batches a step trains on follow the
same distribution; the official run just moves through LAION 1/0.85 times faster.

State. Every stream's state is a small JSON dict (data_pipelines/mixture.py). With several
processes each has its own; `gather_process_states` collects all of them (to be saved by the
checkpoint) and each process restores its own entry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import jax
import numpy as np

from data_pipelines import features as F
from data_pipelines import mixture

_COIN_TAG = 0xA0C5  # separates the aux coin from every other use of the seed


def _per_process(name: str, global_size: int, process_count: int, shards: int) -> int:
  if global_size % process_count:
    raise ValueError(f"config.batch.{name} = {global_size} (global) is not divisible by the "
                     f"{process_count} processes")
  local = global_size // process_count
  if global_size % shards:
    raise ValueError(f"config.batch.{name} = {global_size} (global) is not divisible by the "
                     f"{shards} batch shards (mesh data x fsdp)")
  return local


def local_batch_sizes(cfg, mesh, process_count: int, accum_steps: int = 1) -> F.BatchSizes:
  """Per-process BatchSizes of one micro-batch from the config's GLOBAL sizes (per update;
  with gradient accumulation each of the `accum_steps` micro-batches holds 1/accum_steps of
  them); errors name the offending field."""
  b = cfg.batch
  shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
  if accum_steps < 1:
    raise ValueError(f"config.train.accum_steps must be >= 1, got {accum_steps}")
  sizes = {}
  for name, field in (("image", "image_batch"), ("region", "region_batch"),
                      ("region_max_images", "region_max_images"), ("video", "video_batch")):
    value = int(b[name])
    if value < 0:
      raise ValueError(f"config.batch.{name} must be >= 0, got {value}")
    if value % accum_steps:
      raise ValueError(f"config.batch.{name} = {value} (global, per update) is not divisible by "
                       f"config.train.accum_steps = {accum_steps} micro-batches")
    value //= accum_steps
    sizes[field] = _per_process(name, value, process_count, shards) if value else 0
  if sizes["region_batch"] and not sizes["region_max_images"]:
    raise ValueError("config.batch.region > 0 needs config.batch.region_max_images > 0")
  if not any(sizes[f] for f in ("image_batch", "region_batch", "video_batch")):
    raise ValueError("config.batch: every kind has batch size 0; nothing to train on")
  return F.BatchSizes(image_res=int(cfg.model.image_res), patch_size=16,
                      max_tokens=int(cfg.data.max_tokens), max_masks=int(cfg.data.max_masks),
                      frame_len=int(cfg.batch.frame_len), **sizes)


def preproc_config(cfg) -> F.PreprocConfig:
  """PreprocConfig (training transforms) from the config's `data` and `model` sections."""
  d = cfg.data
  return F.PreprocConfig(
      image_res=int(cfg.model.image_res), patch_size=16, max_tokens=int(d.max_tokens),
      max_masks=int(d.max_masks), mask_prob=float(d.mask_prob),
      skipgram_prb=float(d.skipgram_prb), skipgram_size=int(d.skipgram_size),
      mask_whole_word=bool(d.mask_whole_word), min_perc_in_image=float(d.min_perc_in_image),
      max_regions=int(d.max_regions), frame_len=int(cfg.batch.frame_len),
      randaugment=bool(d.randaugment), crop_scale=tuple(float(x) for x in d.crop_scale),
      careful_hflip=bool(d.careful_hflip), hflip=bool(d.hflip), train=True)


def tokenizer_dir(cfg) -> str:
  """The tokenizer directory: data.tokenizer, else init.bert_dir ('minilm' resolved)."""
  from x2vlm_jax.init_lib import resolve_dir  # pylint: disable=g-import-not-at-top
  path = cfg.data.tokenizer or cfg.init.bert_dir
  if not path:
    raise ValueError("config.data.tokenizer is empty and there is no config.init.bert_dir to "
                     "take the tokenizer from")
  return resolve_dir(path)


def _only(sizes: F.BatchSizes, kind: str) -> F.BatchSizes:
  """`sizes` with every other kind's batch set to 0."""
  keep = {F.IMAGE: ("image_batch",), F.REGION: ("region_batch", "region_max_images"),
          F.VIDEO: ("video_batch",)}[kind]
  zero = {f: 0 for f in ("image_batch", "region_batch", "region_max_images", "video_batch")
          if f not in keep}
  return F.BatchSizes(**{**sizes.__dict__, **zero})


def _data_options(d) -> dict:
  return {"num_workers": d.num_workers, "worker_buffer_size": d.worker_buffer_size,
          "read_threads": d.read_threads}


class DataStreams:
  """Main and aux iterators per kind; `next(step)` returns that step's host-local MixedBatch.

  Args:
    cfg: the run config (data, loss.aux_iter_perc).
    sizes: per-process batch sizes.
    preproc, tokenizer: per-example preprocessing.
    seed: the run seed (shuffling, augmentation, the aux coin).
    process_index, process_count: this process's data shard.
  """

  def __init__(self, cfg, sizes: F.BatchSizes, preproc: F.PreprocConfig, tokenizer, seed: int,
               process_index: int, process_count: int, *, make_example=None):
    self.seed = int(seed)
    self.sizes = sizes
    spec = F.batch_spec(sizes)
    self.kinds = tuple(k for k in F.KINDS if k in spec)
    aux_cfg = cfg.data.aux
    self.aux_prob = {}
    for kind in aux_cfg.keys():
      p = float(cfg.loss.aux_iter_perc.get(kind, 0.0))
      if aux_cfg[kind] and p > 0 and kind in self.kinds:
        if not 0 < p <= 1:
          raise ValueError(f"config.loss.aux_iter_perc.{kind} = {p} must be in (0, 1]")
        self.aux_prob[kind] = p
      elif aux_cfg[kind] and kind in self.kinds:
        raise ValueError(f"config.data.aux.{kind} has sources but loss.aux_iter_perc.{kind} is "
                         f"{p}: the aux stream would never be used")
    common = dict(_data_options(cfg.data), **{"num_epochs": None})
    self._streams: dict[str, mixture.MixedBatchIterator] = {}
    for kind in self.kinds:
      for stream, sources, seed_offset in (("main", cfg.data[kind], 0),
                                           ("aux", aux_cfg.get(kind, []), 1)):
        if stream == "aux" and kind not in self.aux_prob:
          continue
        data_cfg = {**common, kind: [dict(s) for s in sources]}
        # The aux stream gets its own seed so its shuffles and augmentations are not those of
        # the main stream at the same positions.
        self._streams[f"{stream}/{kind}"] = mixture.make_train_iterator(
            data_cfg, _only(sizes, kind), preproc, tokenizer,
            mixture.seed32(self.seed, seed_offset) if seed_offset else self.seed,
            process_index, process_count, make_example=make_example)

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
      raise ValueError(f"saved data state has streams {sorted(state)}, this run has "
                       f"{sorted(self._streams)} (data sources or aux settings changed?)")
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
  padded[:data.size] = data
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, width)
  lengths = np.asarray(lengths).reshape(-1)
  return {f"process_{i}": json.loads(bytes(every[i, :lengths[i]]).decode())
          for i in range(every.shape[0])}
