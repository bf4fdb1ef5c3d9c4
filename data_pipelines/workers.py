"""Worker processes of the input pipeline: start method, and exit when the parent dies.

grain's `mp_prefetch` starts its workers with the *spawn* start method (a fresh interpreter that
re-imports the parent's `__main__`), so every script that builds a pipeline with workers must
keep its top-level code under `if __name__ == "__main__":`.

Workers are daemonic, but daemonic children are only reaped when the parent exits normally; after
`kill -9` of the trainer they would sit blocked on their output queue forever. `worker_init_fn()`
returns the hook that every worker runs first; it makes the worker exit as soon as its parent
process is gone, by two independent means:

1. Linux `prctl(PR_SET_PDEATHSIG)`: the kernel signals the worker when its parent dies. The kernel
   sends this signal when the *thread* that started the worker exits, and grain starts workers from
   short-lived helper threads, so the signal is not fatal by itself: its handler only exits when
   the worker has actually been re-parented (os.getppid() changed).
2. A daemon watchdog thread that polls os.getppid() and exits the same way (other platforms, and
   any case where the signal handler cannot run because the main thread is stuck in C code).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import sys
import threading

# Linux <sys/prctl.h>.
_PR_SET_PDEATHSIG = 1
# A signal nobody else in the pipeline uses; its handler checks for a real parent death.
_DEATH_SIGNAL = signal.SIGUSR2
WATCHDOG_PERIOD_S = 0.5


def _exit_if_orphaned(parent_pid: int) -> None:
  if os.getppid() != parent_pid:
    # os._exit: no cleanup handlers, nothing that could block on the dead parent's queues.
    os._exit(1)


def _set_parent_death_signal(parent_pid: int) -> bool:
  """Installs PR_SET_PDEATHSIG (Linux only); returns whether it took effect."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
  except OSError:
    return False
  signal.signal(_DEATH_SIGNAL, lambda signum, frame: _exit_if_orphaned(parent_pid))
  if libc.prctl(_PR_SET_PDEATHSIG, int(_DEATH_SIGNAL), 0, 0, 0) != 0:
    return False
  # The parent may have died before prctl was in place: then no signal will ever come.
  _exit_if_orphaned(parent_pid)
  return True


def _watchdog(parent_pid: int, period_s: float) -> None:
  while True:
    _exit_if_orphaned(parent_pid)
    threading.Event().wait(period_s)


def exit_with_parent(
  parent_pid: int, worker_index: int = 0, worker_count: int = 1, period_s: float = WATCHDOG_PERIOD_S
) -> None:
  """Runs inside a worker: arranges for it to exit once `parent_pid` is no longer its parent.

  Signature (…, worker_index, worker_count) matches grain's `mp_prefetch(worker_init_fn=…)`
  after `parent_pid` is bound with functools.partial.
  """
  del worker_index, worker_count  # the same guard for every worker
  _set_parent_death_signal(parent_pid)
  threading.Thread(
    target=_watchdog, args=(parent_pid, period_s), daemon=True, name="parent-watchdog"
  ).start()


def worker_init_fn(period_s: float = WATCHDOG_PERIOD_S):
  """The (worker_index, worker_count) -> None hook for mp_prefetch, bound to this process's pid."""
  return functools.partial(exit_with_parent, os.getpid(), period_s=period_s)


def ensure_absl_flags_parsed() -> None:
  """Lets grain start workers in programs that never parse absl flags (pytest, notebooks).

  grain 0.2.18 reads the `--grain_enable_multiprocess_worker_profiling` flag's `.value` when it
  starts workers, which raises UnparsedFlagAccessError unless absl flags were parsed. Marking
  them parsed keeps every flag at its default and leaves sys.argv alone.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
