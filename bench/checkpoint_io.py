"""Save and restore time of a train-state checkpoint, with and without verification; prints one
JSON object (docs/training.md#checkpoint-integrity).

  python bench/checkpoint_io.py --variant base [--part state|params] [--dir /tmp/ckpt_bench]

The state is the trainer's (`train_state.TrainStateSpec`: parameters, the Adam moments,
counters; `--part params`: the parameters alone) of the variant, filled with random values, on
one CPU device. Measured, each once after untimed warm-ups (the fingerprint jit of the tree and
of the parameters' sub-tree is compiled once per process and shape set:
`fingerprint_compile_s`):

  save_s                 `CheckpointManager.save` to commit (synchronous), everything included
  of_which_checksums_s   the per-leaf fingerprints (`checksums.leaf_checksums`)
  of_which_manifest_s    hashing every file into the manifest (`ckpt_manifest.build`)
  restore_verified_s     `restore` as the trainer runs it: manifest check, read, fingerprints
  restore_unverified_s   `restore(verify=False)`: the read alone
  check_step_s           the manifest check alone (`check_step`)
  restore_params_*_s     the parameters-only read of evaluation (`partial=True`), both ways

Each time is [wall s, CPU s of the process] (CPU time sums the threads; on a shared machine it
is the steadier figure). Reads come from a warm page cache (the step was just written); a cold
read adds the disk's read time to both restore figures (the manifest check reads every file once
more).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def _args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--variant", default="base", choices=["tiny", "demo", "base", "large"])
  p.add_argument("--part", default="state", choices=["state", "params"])
  p.add_argument("--dir", default="/tmp/x2vlm_ckpt_bench")
  return p.parse_args()


def _timed(fn) -> list[float]:
  """[wall seconds, CPU seconds of this process] of `fn()`; its result is dropped at once (a
  restored state is as large as the state: two at a time would not fit where one does)."""
  t, c = time.perf_counter(), time.process_time()
  fn()
  return [round(time.perf_counter() - t, 3), round(time.process_time() - c, 3)]


def main():
  args = _args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import numpy as np

  from x2vlm_jax import checkpoint as ck
  from x2vlm_jax import checksums, ckpt_manifest, optim, sharding
  from x2vlm_jax.models.config import ModelConfig
  from x2vlm_jax.train_state import TrainStateSpec

  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  spec = TrainStateSpec.build(ModelConfig.named(args.variant), optim.OptimConfig(), mesh)
  target = spec.checkpoint_target()["train"]
  if args.part == "params":
    target = {"params": target["params"]}
  rng = np.random.default_rng(0)

  def fill(a):
    host = rng.random(a.shape, np.float32).astype(a.dtype) if a.size else np.zeros(a.shape, a.dtype)
    return jax.device_put(host, a.sharding)

  state = jax.tree.map(fill, target)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  compile_s = _timed(lambda: checksums.leaf_checksums(state))  # compiles the fingerprint jit
  checksums_s = _timed(lambda: checksums.leaf_checksums(state))
  shutil.rmtree(args.dir, ignore_errors=True)
  out = {"variant": args.variant, "part": args.part, "state_bytes": nbytes, "leaves": 0}
  out["leaves"] = len(jax.tree.leaves(state))
  with ck.CheckpointManager(args.dir, async_save=False) as mgr:
    out["save_s"] = _timed(lambda: mgr.save(1, state, config={"bench": 1}, force=True))
    step_dir = mgr.step_dir(1)
    out["of_which_checksums_s"] = checksums_s
    out["fingerprint_compile_s"] = compile_s
    out["of_which_manifest_s"] = _timed(lambda: ckpt_manifest.build(step_dir, "x"))
    out["files"] = len(json.loads((step_dir / ckpt_manifest.MANIFEST).read_text())["files"])
    out["disk_bytes"] = sum(
      os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(step_dir) for f in fs
    )
    mgr.restore(target, verify=False)  # warm the page cache and orbax's code paths
    out["restore_unverified_s"] = _timed(lambda: mgr.restore(target, verify=False))
    out["restore_verified_s"] = _timed(lambda: mgr.restore(target))
    out["check_step_s"] = _timed(lambda: mgr.check_step(1))
    params = {"params": target["params"]}
    read = lambda verify: mgr.restore(params, partial=True, verify=verify)
    read(True)  # compiles the fingerprint jit of the parameters' sub-tree
    out["restore_params_unverified_s"] = _timed(lambda: read(False))
    out["restore_params_verified_s"] = _timed(lambda: read(True))
  shutil.rmtree(args.dir, ignore_errors=True)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
