"""Metrics output: TensorBoard event files, a JSONL file and a one-line progress report.

Only process 0 writes (`jax.process_index() == 0`); on every other process the writer creates no
files and all its methods do nothing, so the train loop can call it unconditionally.

TensorBoard files come from tensorboardX (no TensorFlow; clu's writers would import it). The
JSONL file `<workdir>/metrics.jsonl` gets one JSON object per `write_scalars` call:

  {"step": 120, "wall_time": 1732371234.5, "metrics": {"train/loss": 3.21, ...}}

Non-finite values are written as the strings "NaN", "Infinity", "-Infinity", so every line is
strict JSON and a diverged run is still visible in the file.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np
from absl import logging

JSONL_NAME = "metrics.jsonl"
_WRITERS = itertools.count()  # distinguishes the event files of one process


def _import_tensorboardx():
  """Imports tensorboardX without letting it pull in torch (an optional extra of this project).

  tensorboardX imports torch, when installed, only to recognise torch tensors; that costs seconds
  of start-up and memory in every process. Hiding torch during the import makes tensorboardX use
  its numpy-only path (it catches the ImportError). If torch is already loaded we leave it alone.
  """
  if "torch" in sys.modules:
    import tensorboardX

    return tensorboardX
  sys.modules["torch"] = None  # `import torch` now raises ImportError
  try:
    import tensorboardX
  finally:
    del sys.modules["torch"]
  return tensorboardX


def _to_float(name: str, value) -> float:
  """A python float from a python/numpy/jax scalar; clear error for anything else."""
  try:
    arr = np.asarray(value)
  except Exception as e:  # e.g. a non-addressable jax array
    raise TypeError(f"metric {name!r}: cannot read value of type {type(value).__name__}") from e
  if arr.size != 1 or arr.dtype == object:
    raise TypeError(f"metric {name!r} must be a scalar, got shape {arr.shape} dtype {arr.dtype}")
  return float(arr.reshape(()))


def _json_number(x: float):
  if math.isnan(x):
    return "NaN"
  if math.isinf(x):
    return "Infinity" if x > 0 else "-Infinity"
  return x


class MetricsWriter:
  """Writes scalar metrics to TensorBoard and JSONL and logs lines, on process 0 only.

  Args:
    workdir: the run directory; `metrics.jsonl` and the event files are written there.
    tensorboard: also write TensorBoard event files (to `workdir/tb_subdir`).
    tb_subdir: sub-directory for event files ('' = the workdir itself).
    process_index: override of `jax.process_index()` (tests, custom launchers).
    purge_step: start the event file with TensorBoard's purge event: events of steps >=
      purge_step written before it (by a run that died after them) are hidden.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    tensorboard: bool = True,
    tb_subdir: str = "",
    process_index: int | None = None,
    purge_step: int | None = None,
  ):
    self.workdir = os.fspath(workdir)
    self.active = (jax.process_index() if process_index is None else process_index) == 0
    self._jsonl = None
    self._tb = None
    if not self.active:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self._jsonl = open(os.path.join(self.workdir, JSONL_NAME), "a", encoding="utf-8")
    if tensorboard:
      tbx = _import_tensorboardx()
      # tensorboardX names the file by the second and the host and opens it with 'wb': the
      # suffix keeps a writer opened within the same second (a quick restart) from overwriting.
      self._tb = tbx.SummaryWriter(
        logdir=os.path.join(self.workdir, tb_subdir),
        flush_secs=30,
        purge_step=purge_step,
        filename_suffix=f".{os.getpid()}.{next(_WRITERS)}",
      )

  @property
  def jsonl_path(self) -> str:
    """Path of the JSONL metrics file."""
    return os.path.join(self.workdir, JSONL_NAME)

  def write_scalars(self, step: int, metrics: Mapping[str, object]):
    """Writes one step's scalars (names like 'train/loss/itc') to JSONL and TensorBoard."""
    if not self.active:
      return
    values = {k: _to_float(k, v) for k, v in metrics.items()}
    now = time.time()
    line = {
      "step": int(step),
      "wall_time": now,
      "metrics": {k: _json_number(v) for k, v in values.items()},
    }
    self._jsonl.write(json.dumps(line, allow_nan=False) + "\n")
    self._jsonl.flush()  # one line per write: a crash loses at most the line being written
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, global_step=int(step), walltime=now)

  def write_text(self, step: int, tag: str, text: str):
    """A text summary (e.g. the config or the sharding report) in TensorBoard."""
    if self.active and self._tb is not None:
      self._tb.add_text(tag, text, global_step=int(step))

  def log(self, line: str):
    """Logs a line (e.g. `Progress.update`'s) through absl logging, on process 0 only."""
    if self.active:
      logging.info("%s", line)

  def flush(self):
    """Flushes pending TensorBoard events."""
    if self.active and self._tb is not None:
      self._tb.flush()

  def close(self):
    """Flushes and closes the files (further writes raise)."""
    if not self.active:
      return
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
    self.active = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ----------------------------------------------------------------------------------------------
# Progress line.

_LOSS_KEY = re.compile(r"(?:^|/)loss(?:/(?P<term>[^/]+))?$")


def _format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  days, rest = divmod(seconds, 86400)
  text = str(datetime.timedelta(seconds=rest))
  return f"{days}d {text}" if days else text


def format_progress(
  step: int,
  total_steps: int,
  metrics: Mapping[str, object] | None = None,
  *,
  examples_per_sec: Mapping[str, float] | None = None,
  eta_seconds: float | None = None,
  mfu: float | None = None,
) -> str:
  """One human-readable progress line.

  Example: 'step 120/1000 (12.0%) | loss 3.2100 itc 1.0200 itm 0.5500 | ex/s image 512.0
  region 128.0 | ETA 0:14:40 | MFU 41.2%'.

  Args:
    step, total_steps: progress.
    metrics: any metrics; the total ('loss', 'train/loss') and its terms ('loss/itc',
      'train/loss/itm', ...) are shown, everything else is left out.
    examples_per_sec: throughput per data kind.
    eta_seconds: estimated time to the end.
    mfu: model-FLOPs utilisation as a fraction (0.412 -> '41.2%').
  """
  parts = [f"step {step}/{total_steps} ({100.0 * step / max(total_steps, 1):.1f}%)"]
  if metrics:
    total, terms = None, []
    for key in sorted(metrics):
      m = _LOSS_KEY.search(key)
      if m is None:
        continue
      value = _to_float(key, metrics[key])
      if m.group("term") is None:
        total = value
      else:
        terms.append(f"{m.group('term')} {value:.4f}")
    losses = ([f"loss {total:.4f}"] if total is not None else []) + terms
    if losses:
      parts.append(" ".join(losses))
  if examples_per_sec:
    parts.append("ex/s " + " ".join(f"{k} {v:.1f}" for k, v in examples_per_sec.items()))
  if eta_seconds is not None:
    parts.append(f"ETA {_format_duration(eta_seconds)}")
  if mfu is not None:
    parts.append(f"MFU {100.0 * mfu:.1f}%")
  return " | ".join(parts)


class Progress:
  """Measures steady-state throughput and the ETA, and formats the progress line.

  Time the loop spends outside steps is reported with `pause(reason, seconds)`. Compilation
  happens once per program, and the steps of its window also pay one-off costs (the first
  execution, data workers starting), while the window after it runs fast on the batches the
  input pipeline prefetched during the compile: both give the rates of their own lines, but the
  ETA uses only later windows (once there is one). Recurring pauses (checkpoint saves,
  evaluations) are left out of the rates, shown on the line of the window they fell in, and
  added to the ETA at their average cost per step so far.

  Args:
    total_steps: the step the run ends at.
    examples_per_step: examples of each data kind consumed per step (global sub-batch sizes).
    start_step: the step the timer starts at (the restored step when resuming).
    clock: a monotonic clock in seconds (injectable for tests).
  """

  ONE_OFF = ("compile",)  # pauses that do not recur: their windows are warm-up

  def __init__(
    self,
    total_steps: int,
    examples_per_step: Mapping[str, int],
    *,
    start_step: int = 0,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.total_steps = total_steps
    self.examples_per_step = dict(examples_per_step)
    self._clock = clock
    self._last_step, self._last_time = start_step, clock()
    self._start_step = start_step
    self._window_pauses: dict[str, float] = {}
    self._steady = [0, 0.0]  # steps and busy seconds of windows without one-off pauses
    self._after_one_off = False  # the previous window had one: this one drains its prefetch
    self._recurring = 0.0  # seconds of recurring pauses since the start

  def pause(self, reason: str, seconds: float) -> None:
    """`seconds` of the current window went to `reason` (compile, checkpoint, eval), not steps."""
    self._window_pauses[reason] = self._window_pauses.get(reason, 0.0) + seconds
    if reason not in self.ONE_OFF:
      self._recurring += seconds

  def _window(self, step: int) -> tuple[int, float]:
    """(steps, busy seconds) since the previous line, pauses left out."""
    busy = self._clock() - self._last_time - sum(self._window_pauses.values())
    return step - self._last_step, busy

  def window_steps_per_sec(self, step: int) -> float:
    """Steady-state steps per second since the previous line (pauses left out)."""
    steps, busy = self._window(step)
    return steps / busy if steps > 0 and busy > 0 else 0.0

  def update(
    self, step: int, metrics: Mapping[str, object] | None = None, mfu: float | None = None
  ) -> str:
    """The progress line at `step`: rates over the steps since the previous call; ETA =
    remaining steps x (steady time per step + recurring pauses per step so far)."""
    steps, busy = self._window(step)
    rates = None
    if steps > 0 and busy > 0:
      rates = {k: n * steps / busy for k, n in self.examples_per_step.items()}
    one_off = any(k in self.ONE_OFF for k in self._window_pauses)
    if rates is not None and not (one_off or self._after_one_off):
      self._steady[0] += steps
      self._steady[1] += busy
    self._after_one_off = one_off
    n, t = self._steady if self._steady[0] else (steps, busy)  # warm-up windows only so far
    eta = None
    if n > 0 and t > 0:
      done = max(step - self._start_step, 1)
      eta = (self.total_steps - step) * (t / n + self._recurring / done)
    paused = {k: v for k, v in self._window_pauses.items() if v > 0}
    self._last_step, self._last_time, self._window_pauses = step, self._clock(), {}
    line = format_progress(
      step, self.total_steps, metrics, examples_per_sec=rates, eta_seconds=eta, mfu=mfu
    )
    if paused:  # the window's non-step time, so a slow line explains itself
      line += " | paused " + " ".join(f"{k} {v:.1f} s" for k, v in sorted(paused.items()))
    return line

  def steps_per_sec(self) -> float:
    """Steady-state steps per second (windows without one-off pauses; 0 before one)."""
    n, t = self._steady
    return n / t if t > 0 else 0.0
