"""glibc malloc settings that keep the XLA CPU runtime from re-faulting its memory every step.

XLA:CPU allocates the temporary buffers of each execution (one block: 52 MB for the official-tiny
pre-training step, 3.6 GB for base) with malloc and frees them when the execution ends. glibc
serves a block above its mmap threshold with a fresh `mmap` and returns it with `munmap`, so on
every step the kernel maps the block again and zero-fills it page by page: 12.8k page faults and
~30 ms of system time per official-tiny step of 0.05 s (docs/benchmarks.md#host-memory).

`keep_heap` tells glibc never to serve a malloc with `mmap` (M_MMAP_MAX 0) and never to give the
top of a heap back to the kernel (M_TRIM_THRESHOLD at its maximum): the block then comes from a
heap whose pages stay mapped, and the next step reuses them (official-tiny step: 12.8k -> 0-323
faults, 0.052 -> 0.039 s median over 4 alternating runs). Its limit: with JAX's asynchronous CPU
dispatch the block is allocated by one of XLA's worker threads, whose glibc heaps hold at most
64 MB; a larger block (base: 3.6 GB) still gets a mapping of its own on every step.

`sync_dispatch` (off by default) runs each execution on the thread that dispatches it
(`jax_cpu_enable_async_dispatch=False`), whose allocations come from glibc's main heap, which has
no such limit: the block stops faulting at any size (base: 1.05 M -> 0.17 M faults per step; the
rest are other allocations of the worker threads). But the trainer's input pipeline then no
longer keeps up with the step, even on its own batch thread (train_batches): the tiny config's
training run drops from 184-188 to 117-121 examples/s. Worth it only when a step
takes seconds and its batch milliseconds (base-size models on CPU). It must be set before JAX
creates its backends.

What it costs: the process keeps its high-water mark of heap memory mapped (a training step
reaches it on every step anyway). The settings are made only with glibc and, for `keep_heap`,
only when the default backend is CPU (on GPU / TPU the big buffers live on the device);
`train.cpu_host_tuning = False` leaves glibc's defaults, `train.cpu_sync_dispatch = True` asks
for the second setting (docs/benchmarks.md#host-memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import jax

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _glibc():
  """The C library if it is glibc (mallopt with glibc's parameter numbers), else None."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
  except (OSError, AttributeError):
    return None
  return libc


def keep_heap() -> bool:
  """glibc: no mmap-served mallocs, no heap trimming (see the module docstring). False when the C
  library is not glibc or refuses a setting."""
  libc = _glibc()
  if libc is None:
    return False
  # -1 as mallopt's int is SIZE_MAX inside glibc: the top of a heap is never trimmed.
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def backends_initialized() -> bool:
  """Whether JAX has created its backends (the dispatch mode is fixed from then on)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  return xla_bridge.backends_are_initialized()


def setup(keep: bool = True, sync_dispatch: bool = False) -> dict[str, bool]:
  """Makes the settings asked for where they apply (see the module docstring); returns which were
  made. Process-wide: entry points call it (train.py, eval.py, bench/train_step.py,
  bench/eval.py) before anything touches a device, not library code."""
  done = {"keep_heap": False, "sync_dispatch": False}
  if sync_dispatch:
    if backends_initialized():
      raise RuntimeError("cpu_host.setup(sync_dispatch=True) after JAX created its backends")
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    done["sync_dispatch"] = True
  if keep and jax.default_backend() == "cpu":
    done["keep_heap"] = keep_heap()
  return done
