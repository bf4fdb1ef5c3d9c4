"""x2vlm_jax.cpu_host: with its settings (the kept heap, executions on the dispatching thread) a
jitted layer loop that stacks a 40 MB buffer stops re-faulting that memory on every call; with
JAX's and glibc's defaults it faults it in again each time (the effect
docs/benchmarks.md#host-memory measures on the training step).

Each case runs in its own process: malloc settings are process-wide and would leak into the
rest of the suite.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from x2vlm_jax import cpu_host

ROOT = pathlib.Path(__file__).resolve().parents[1]
CALLS = 7

SCRIPT = f"""
import resource, sys
import jax, jax.numpy as jnp
from x2vlm_jax import cpu_host

made = cpu_host.setup(sys.argv[1] == "on", sync_dispatch=sys.argv[1] == "on")

@jax.jit
def step(x):
  # 10 layers whose outputs are stacked for later use: XLA keeps the [10, 1M] float32 stack
  # (40 MB: above glibc's largest mmap threshold, 32 MB) in the execution's temporary block,
  # allocated and freed on every call.
  _, ys = jax.lax.scan(lambda c, _: (c * 1.5, jnp.sin(c)), x, None, length=10)
  return ys[::3].sum()

x = jnp.ones((1 << 20,), jnp.float32)
for _ in range(5):  # the heap grows to its steady size in the first calls
  step(x).block_until_ready()
faults = []
for _ in range({CALLS}):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median call: a one-off growth of the heap (seen once in a few runs) does not count.
print(made["keep_heap"] and made["sync_dispatch"], sorted(faults)[len(faults) // 2])
"""


def _faults_per_call(setting: str) -> tuple[bool, float]:
  # XLA's default options and no compilation cache: the suite's test flags (no backend
  # optimisation, 8 devices) change the program's buffers and so its allocation pattern.
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT, setting],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  ).stdout.split()
  return out[-2] == "True", float(out[-1])


@pytest.mark.skipif(cpu_host._glibc() is None, reason="the settings are glibc's (mallopt)")
def test_kept_heap_stops_per_call_page_faults():
  made_off, faults_off = _faults_per_call("off")
  made_on, faults_on = _faults_per_call("on")
  assert (made_off, made_on) == (False, True)
  # Defaults: the block is mapped afresh on every call (10k pages of 4 KiB: 10-14k faults per
  # call measured here; ~20 where transparent huge pages are always on); kept heap + sync
  # dispatch: the same pages every call (0 measured).
  if faults_off == 0:
    pytest.skip("glibc's defaults do not re-fault the block on this host (another allocator?)")
  assert faults_on <= faults_off / 20, (faults_on, faults_off)


def test_sync_dispatch_once_backends_exist_is_refused():
  import jax

  jax.devices()  # the backends exist from here on; the dispatch mode can no longer change
  with pytest.raises(RuntimeError, match="after JAX created its backends"):
    cpu_host.setup(keep=False, sync_dispatch=True)
