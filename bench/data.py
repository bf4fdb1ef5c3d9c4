"""Input-pipeline throughput on synthetic data; prints one JSON object.

  python bench/data.py [--workers N] [--seconds S] [--image_res 224] [--source_size 384]

Measures, per kind (image-text with the full pre-training augmentation, region, 3-frame video):
  * `per_worker`: examples/s of make_example alone in one process (decode + augment + tokenise
    + MLM mask): what one worker process can deliver; `per_cpu_second` divides by the CPU time
    this process used instead of wall time (one dedicated core, even on a shared machine);
  * `pipeline_0`: examples/s of the whole per-kind pipeline (mixture.kind_dataset: shard,
    shuffle, per-example seed, skip accounting, packing) with no worker process;
  * `pipeline_N`: the same with N worker processes: the host throughput of that kind.
Records are synthetic shapes-world JPEGs of `source_size` px, built once and held in memory, so
the figures exclude disk and record generation. The target is >= 200 augmented 224-px
images/s per CPU core (`image.per_cpu_second`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from data_pipelines import features as F  # noqa: E402

TARGET_PER_CORE = 200.0


class MemorySource:
  """Pre-built records (random access, picklable): no generation cost while timing.

  It reports a large length and cycles through its records, because grain's index shuffle costs
  about 1 ms per element on a 100-element dataset but ~40 us on a million (measured), and real
  sources are large.
  """

  def __init__(self, records, length: int = 1_000_000):
    self.records, self.length = list(records), int(length)

  def __len__(self):
    return self.length

  def __getitem__(self, i):
    return self.records[int(i) % len(self.records)]


def _records(kind: str, n: int, size: int) -> MemorySource:
  from data_pipelines import synthetic

  world = synthetic.ShapesWorld(
    synthetic.WorldConfig(image_size=size, image_format="jpeg", min_frames=8, max_frames=12)
  )
  return MemorySource(world.record(kind, i) for i in range(n))


def _rate(fn, seconds: float, warmup: int = 2) -> tuple[float, float]:
  """(units per wall second, units per CPU second of this process) of fn() -> units.

  The CPU-second rate is what one dedicated core delivers, even on a busy shared machine.
  """
  for _ in range(warmup):
    fn()
  units, start, cpu0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    units += fn()
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
  return units / wall, units / max(cpu, 1e-9)


def _per_worker(kind, source, pre, tok, seconds):
  from data_pipelines.examples import make_example

  state = {"i": 0}

  def one():
    i = state["i"]
    state["i"] += 1
    make_example(kind, source[i], np.random.default_rng(i), pre, tok)
    return 1

  return _rate(one, seconds)


def _pipeline(kind, source, sizes, pre, tok, workers, seconds):
  from data_pipelines import mixture

  ds = mixture.kind_dataset(
    kind,
    [source],
    sizes,
    pre,
    tok,
    seed=0,
    num_workers=workers,
    worker_buffer_size=16,
    read_threads=1,
  )
  it = iter(ds)
  per = {F.IMAGE: sizes.image_batch, F.VIDEO: sizes.video_batch, F.REGION: sizes.region_max_images}[
    kind
  ]

  def one():
    next(it)
    return per

  try:
    return _rate(one, seconds, warmup=3 if workers else 1)[0]
  finally:
    it.close()


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workers", type=int, default=os.cpu_count())
  p.add_argument("--seconds", type=float, default=10.0)
  p.add_argument("--image_res", type=int, default=224)
  p.add_argument("--source_size", type=int, default=384, help="side of the synthetic JPEGs")
  p.add_argument("--records", type=int, default=48)
  p.add_argument("--kinds", default=",".join(F.KINDS))
  args = p.parse_args()

  from data_pipelines import assets
  from data_pipelines.text_ops import Tokenizer

  r = args.image_res
  sizes = F.BatchSizes(
    image_res=r,
    max_tokens=40,
    max_masks=12,
    image_batch=32,
    region_batch=64,
    region_max_images=16,
    video_batch=8,
    frame_len=3,
  )
  pre = F.PreprocConfig(image_res=r, max_tokens=40, max_masks=12)
  tok = Tokenizer(assets.minilm_dir(), max_tokens=40)
  out = {
    "cpu_count": os.cpu_count(),
    "load_avg_1m": os.getloadavg()[0],
    "image_res": r,
    "source_jpeg_px": args.source_size,
    "workers": args.workers,
    "seconds": args.seconds,
    "units": "examples/s (region: images/s; video: clips of 3 frames/s)",
    "kinds": {},
  }
  for kind in args.kinds.split(","):
    source = _records(kind, args.records, args.source_size)
    wall, cpu = _per_worker(kind, source, pre, tok, args.seconds)
    res = {"per_worker": wall, "per_cpu_second": cpu}
    res["pipeline_0"] = _pipeline(kind, source, sizes, pre, tok, 0, args.seconds)
    if args.workers:
      res[f"pipeline_{args.workers}"] = _pipeline(
        kind, source, sizes, pre, tok, args.workers, args.seconds
      )
      res["per_core_with_workers"] = res[f"pipeline_{args.workers}"] / min(
        args.workers, os.cpu_count()
      )
    out["kinds"][kind] = {k: round(v, 1) for k, v in res.items()}
    print(json.dumps({kind: out["kinds"][kind]}), file=sys.stderr, flush=True)
  if F.IMAGE in out["kinds"]:
    out["image_target_per_core"] = TARGET_PER_CORE
    out["image_per_core_vs_target"] = round(
      out["kinds"][F.IMAGE]["per_cpu_second"] / TARGET_PER_CORE, 3
    )
  print(json.dumps(out, indent=1))


if __name__ == "__main__":  # workers use the spawn start method: keep this guard
  main()
