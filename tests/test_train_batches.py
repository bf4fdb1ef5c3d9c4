"""train_batches.StepBatches: the loop's batches made one step ahead on a thread hand out the
same batches as reading the streams in step order, the data state of the last batch handed out
(never the one made ahead), nothing past the end, and a data error at the step that reads it."""

from __future__ import annotations

import json
import threading

import jax
import numpy as np
import pytest

from data_pipelines import features as F
from x2vlm_jax import sharding, train_batches


class _Streams:
  """Stands in for train_data.DataStreams: step s's batch tags every row with s; the state is the
  count of batches read; `fail_at` raises the way a bad record does."""

  def __init__(self, fail_at: int | None = None):
    self.read, self.fail_at, self.threads = [], fail_at, set()

  def next(self, step):
    self.threads.add(threading.get_ident())
    if step == self.fail_at:
      raise ValueError(f"record {step}: field 'image' is not a decodable image")
    self.read.append(step)
    fields = {
      "tag": np.full((8, 1), step, np.int32),
      F.VALID: np.ones((8,), np.int32),
      F.SOURCE_ID: np.zeros((8,), np.int32),  # host-only: logged, never placed
      F.RECORD_ID: np.arange(8, dtype=np.int32) + 8 * step,
    }
    return {"image": fields}, {"image": step % 2 == 0}

  def get_state(self):
    return {"batches_read": len(self.read)}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 8})  # the 8 rows of a micro-batch, one per device


def test_same_batches_and_state_of_the_batch_handed_out(mesh, tmp_path):
  streams, ids = _Streams(), tmp_path / "ids.jsonl"
  batches = train_batches.StepBatches(streams, mesh, accum_steps=2, ids_path=ids, end=5)
  try:
    assert batches.data_state() == {"batches_read": 0}  # a save before the first step
    for step in range(3, 5):  # a resumed run starts at its checkpoint's step
      batch, choice = batches.next(step)
      tags = np.asarray(jax.device_get(batch["image"]["tag"]))
      assert tags.shape == (2, 8, 1) and (tags == step).all()  # 2 micro-batches, stacked
      assert F.RECORD_ID not in batch["image"]
      assert choice == {"image": step % 2 == 0}
      # What a checkpoint of step + 1 saves: the micro-batches of steps 3..step, not the ones of
      # step + 1, which the thread may already have read.
      assert batches.data_state() == {"batches_read": 2 * (step - 2)}
  finally:
    batches.close()
  assert streams.read == [3, 3, 4, 4]  # nothing made for step 5 = end
  assert threading.get_ident() not in streams.threads  # read on the batch thread
  logged = [json.loads(line) for line in ids.read_text().splitlines()]
  assert [(r["step"], r["micro"]) for r in logged] == [(3, 0), (3, 1), (4, 0), (4, 1)]
  assert logged[0]["ids"]["image"][:2] == [[0, 24], [0, 25]]  # step 3: records 24..31


def test_a_data_error_surfaces_at_its_step(mesh):
  streams = _Streams(fail_at=2)
  batches = train_batches.StepBatches(streams, mesh, accum_steps=1, ids_path=None, end=10)
  try:
    batches.next(0)
    batches.next(1)  # step 2's batch fails on the thread meanwhile
    with pytest.raises(ValueError, match="record 2: field 'image'"):
      batches.next(2)
    batch, _ = batches.next(3)  # a later step reads on (a loop stops at the error, though)
    assert int(np.asarray(jax.device_get(batch["image"]["tag"]))[0, 0]) == 3
    with pytest.raises(RuntimeError, match="batch of step 5 asked for; step 4 was made ahead"):
      batches.next(5)  # steps come in order: skipping one is a bug of the caller
  finally:
    batches.close()
