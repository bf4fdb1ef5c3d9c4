"""The training loop's batches: each step's host micro-batches from the data streams, logged and
put on the mesh, made one step ahead on a background thread.

Why a thread: making a batch (reading, decoding, augmenting, tokenising, placing it on the
devices) is host work that would otherwise sit between two steps. With asynchronous dispatch it
overlapped only the device half of a step; on the CPU backend with `train.cpu_sync_dispatch`
(x2vlm_jax/cpu_host.py) the step runs on the loop's thread and nothing would overlap it. The
thread makes the batch of step s + 1 while step s runs (JAX and the data code release the GIL
in their heavy parts).

Exactness: batches are made in step order, one at a time, by the one thread that touches the
streams' iterators. The streams' state (positions) is taken right after each batch is made and
handed out with it, so a checkpoint of step s records the positions after the batch of step
s - 1 was consumed, never those after the batch made ahead, and a resumed run reads the same
batches as the uninterrupted one. No batch is made past `end` (the last step of the run).
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
from collections.abc import Mapping

from x2vlm_jax import global_batch, train_data


class StepBatches:
  """`next(step)`: (global batch, kind -> aux chosen) of `step`; `data_state()`: the streams'
  state after the last batch `next` handed out (what a checkpoint of the following step saves).

  streams: `train_data.DataStreams` or `MvptrStreams`; accum_steps micro-batches per step;
  ids_path: where the example ids of every micro-batch are appended (None = not logged);
  end: no batch is made for this step or later.
  """

  def __init__(self, streams, mesh, accum_steps: int, ids_path: pathlib.Path | None, end: int):
    self.streams, self.mesh, self.accum, self.ids_path = streams, mesh, accum_steps, ids_path
    self.end = end
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="step_batches")
    self._ahead: tuple[int, concurrent.futures.Future] | None = None
    self._state: Mapping | None = None

  def _make(self, step: int) -> tuple[dict, dict[str, bool], Mapping]:
    micro = []
    for i in range(self.accum):
      local, choice = self.streams.next(step)
      if self.ids_path is not None:
        line = {"step": step, "micro": i, "ids": train_data.example_ids(local), "aux": choice}
        with self.ids_path.open("a") as f:
          f.write(json.dumps(line) + "\n")
      micro.append(local)
    state = self.streams.get_state()  # before placing: the batch is read, its positions final
    return global_batch.put(micro, self.mesh), choice, state

  def next(self, step: int) -> tuple[dict, dict[str, bool]]:
    """The batch of `step` (made ahead when the previous call asked for step - 1)."""
    if self._ahead is None:
      made = self._pool.submit(self._make, step)
    elif self._ahead[0] == step:
      made = self._ahead[1]
    else:
      raise RuntimeError(f"batch of step {step} asked for; step {self._ahead[0]} was made ahead")
    self._ahead = None
    batch, choice, self._state = made.result()  # re-raises a data error of that batch here
    if step + 1 < self.end:
      self._ahead = (step + 1, self._pool.submit(self._make, step + 1))
    return batch, choice

  def data_state(self) -> Mapping:
    """The streams' state after the last batch handed out (before any: their current state)."""
    return self.streams.get_state() if self._state is None else self._state

  def close(self) -> None:
    """Waits for a batch still being made (its result and errors are dropped) and stops the
    thread; call it before closing the streams."""
    if self._ahead is not None:
      concurrent.futures.wait([self._ahead[1]])
      self._ahead = None
    self._pool.shutdown(wait=True)
