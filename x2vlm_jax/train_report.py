"""What the training loop reports: per-step metrics read one step late, averaged over the logging
window, the non-finite-update check, the progress line, TensorBoard and `metrics.jsonl`.

The host reads a step's metrics only after it has dispatched the next step, so it never waits
for the device step it just launched (`step_done`). Before a checkpoint is saved the pending
step is read (`flush`): a state whose non-finite count is unchecked is never saved.

`restart_logs` runs on every start: it trims `metrics.jsonl` and the example-id logs to the
step the run starts from and tells TensorBoard to hide later events, so whatever moment a run
died at, its logs read like one uninterrupted run (docs/training.md#logs-after-a-crash).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping

import jax

from x2vlm_jax import metrics_writer
from x2vlm_jax.run_config import LoopConfig


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite updates: the run stops without saving a checkpoint."""


def truncate_jsonl(path: pathlib.Path, start_step: int) -> None:
  """Drops lines of steps >= start_step (they will be redone after a resume)."""
  if not path.exists():
    return
  keep = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)["step"] < start_step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      continue  # a line cut by a kill -9
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(l + "\n" for l in keep))
  tmp.replace(path)  # a crash while trimming leaves the old or the new file, never half


def restart_logs(
  workdir: pathlib.Path, start_step: int, resumed: bool, example_ids: pathlib.Path
) -> metrics_writer.MetricsWriter:
  """Trims the logs to the state the run starts from; returns the run's writer.

  `metrics.jsonl` keeps the lines of steps <= start_step when resuming (its step is the count
  of updates done) and none on a fresh start; this process's example-id log keeps the steps
  < start_step (its step is the index of the step that read the batch); TensorBoard gets a
  purge event, which hides the events of later steps written before it.
  """
  truncate_jsonl(example_ids, start_step)
  first_new = start_step + 1 if resumed else 0
  if jax.process_index() == 0:
    truncate_jsonl(workdir / metrics_writer.JSONL_NAME, first_new)
  return metrics_writer.MetricsWriter(workdir, purge_step=first_new)


def skip_text(skips: Mapping[str, int]) -> str:
  """' | skipped main/image/bad_image 3 ...' (cumulative, per reason) or '' when none."""
  shown = [f"{k} {int(v)}" for k, v in sorted(skips.items()) if v]
  return " | skipped " + " ".join(shown) if shown else ""


def progress_metrics(m: Mapping[str, float]) -> dict[str, float]:
  """'loss/itc/image' -> 'loss/itc_image' so the progress line shows every term."""
  out = {}
  for k, v in m.items():
    parts = k.split("/")
    if parts[0] == "loss":
      out["loss" if parts[1:] == ["total"] else "loss/" + "_".join(parts[1:])] = v
  return out


class MetricsWindow:
  """Sums of per-step metrics, averaged and reset at logging time."""

  def __init__(self):
    self.sums: dict[str, float] = {}
    self.counts: dict[str, int] = {}

  def add(self, metrics: Mapping[str, float]):
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
      self.counts[k] = self.counts.get(k, 0) + 1

  def pop(self) -> dict[str, float]:
    out = {k: self.sums[k] / self.counts[k] for k in self.sums}
    self.sums, self.counts = {}, {}
    return out


class Reporter:
  """Reads finished steps' metrics, checks them, and logs every `loop.log_every` steps.

  Args:
    writer: the run's MetricsWriter.
    loop: the loop settings (total_steps, log_every, max_consecutive_nonfinite, peak_tflops).
    examples_per_step: kind -> global examples per step (for the ex/s of the progress line).
    start_step: the step the run starts (or resumes) at.
    flops_per_device: () -> model FLOPs of one step per device (for MFU; 0 = unknown).
    lr: step -> learning rate (logged).
    skip_counts: () -> cumulative data-skip counters (logged; on the progress line when > 0).
    latest_checkpoint: () -> the newest intact step (named when the run stops), or None.
  """

  def __init__(
    self,
    writer: metrics_writer.MetricsWriter,
    loop: LoopConfig,
    examples_per_step: Mapping[str, int],
    start_step: int,
    *,
    flops_per_device: Callable[[], float],
    lr: Callable[[int], float],
    skip_counts: Callable[[], Mapping[str, int]],
    latest_checkpoint: Callable[[], int | None],
  ):
    self.writer, self.loop = writer, loop
    self.progress = metrics_writer.Progress(
      loop.total_steps, examples_per_step, start_step=start_step
    )
    self.window = MetricsWindow()
    self._flops, self._lr, self._skips = flops_per_device, lr, skip_counts
    self._latest = latest_checkpoint
    self._pending: tuple[int, dict] | None = None

  def step_done(self, step: int, device_metrics: dict) -> None:
    """Step `step` (the count after the update) was dispatched; reads the previous one."""
    self.flush()
    self._pending = (step, device_metrics)

  def pause(self, reason: str, seconds: float) -> None:
    """Time outside steps (compile, checkpoint, eval): out of the rates (`Progress.pause`)."""
    self.progress.pause(reason, seconds)

  def flush(self) -> None:
    """Reads the pending step's metrics now (before a save, and at the end)."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._read(*pending)

  def _read(self, done_step: int, device_metrics: dict) -> None:
    host = jax.device_get(device_metrics)
    bad = int(host.pop("nonfinite_run"))
    total_bad = int(host.pop("nonfinite_total"))
    if bad >= self.loop.max_consecutive_nonfinite > 0:
      latest = self._latest()
      where = (
        "no checkpoint was saved: a relaunch starts from step 0"
        if latest is None
        else f"the newest intact checkpoint is step {latest}: a relaunch resumes there"
      )
      raise NonFiniteError(
        f"{bad} consecutive non-finite updates (last at step {done_step}; "
        f"{total_bad} in total): stopping without saving; {where}"
      )
    self.window.add(host)
    if done_step % self.loop.log_every == 0 or done_step == self.loop.total_steps:
      self._log(done_step, total_bad)

  def _log(self, step: int, total_bad: int) -> None:
    avg = self.window.pop()
    scalars = {f"train/{k}": v for k, v in avg.items()}
    scalars["train/nonfinite_total"] = total_bad
    scalars["train/lr"] = self._lr(step - 1)
    skips = dict(self._skips())
    for k, v in skips.items():
      scalars[f"data/skipped/{k}"] = v
    self.writer.write_scalars(step, scalars)
    peak = self.loop.peak_tflops * 1e12
    flops = self._flops() if peak else 0.0
    # The progress clock is read last: this line's own work (the first one compiles the
    # learning-rate schedule, opens the files) counts in its window, not in the next one.
    mfu = flops * self.progress.window_steps_per_sec(step) / peak if peak and flops else None
    line = self.progress.update(step, progress_metrics(avg), mfu=mfu)
    if total_bad:  # updates left out because their gradients were not finite
      line += f" | non-finite updates skipped {total_bad}"
    self.writer.log(line + skip_text(skips))
