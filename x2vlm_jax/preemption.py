"""Preemption: turn SIGTERM (or the cluster's preemption notice) into "save now and exit 0".

Single process: a SIGTERM handler sets a flag; the train loop polls `should_stop(step)` at every
step boundary, saves that step and exits cleanly.

Several processes: every process must save the *same* step, so a local flag is not enough (the
signal may reach one host only, or the hosts at different steps). When `jax.distributed` is
initialised JAX runs a preemption sync manager: its notifier catches SIGTERM on any host,
tells the coordination service, and `multihost_utils.reached_preemption_sync_point(step)`
returns True on every host at the same step (one past the largest step any host had reached).
We then install no Python handler, because it would replace the one the sync manager relies on.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging


def _sync_manager_available() -> bool:
  """True when JAX's preemption sync manager runs (multi-process jax.distributed)."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class PreemptionWatcher:
  """Answers "must the run save and stop at this step?" from SIGTERM / the preemption notice.

  Args:
    signals: signals treated as a preemption notice in single-process mode.
    use_sync_manager: None = automatic (multi-process with the sync manager running).
  """

  def __init__(self, signals=(signal.SIGTERM,), use_sync_manager: bool | None = None):
    self._flag = threading.Event()
    self._previous = {}
    if use_sync_manager is None:
      use_sync_manager = jax.process_count() > 1 and _sync_manager_available()
    self.multihost = bool(use_sync_manager)
    if jax.process_count() > 1 and not self.multihost:
      logging.warning(
        "several processes but no JAX preemption sync manager: a SIGTERM is "
        "only seen by the process that receives it"
      )
    if not self.multihost and threading.current_thread() is threading.main_thread():
      for s in signals:
        self._previous[s] = signal.signal(s, self._handler)

  def _handler(self, signum, frame):
    del frame
    # Only set a flag: the loop saves at the next step boundary (no work inside the handler).
    logging.warning("received signal %d: saving at the next step boundary, then exiting", signum)
    self._flag.set()

  def notify(self) -> None:
    """Requests a stop as if a preemption notice had arrived (tests, custom schedulers)."""
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    """Polled once per step by every process, with the same `step` sequence on all of them."""
    if self.multihost:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return self._flag.is_set()

  def close(self) -> None:
    """Restores the previous signal handlers."""
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}
