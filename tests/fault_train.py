"""`train.py` with NaNs injected into chosen steps' batches: the test-only driver of the fault
tests (tests/test_train_faults.py). Production code has no switch for this.

  python tests/fault_train.py --nan_steps=2,9 <every train.py flag>

The poison goes into the host batch (one MLM weight of the first kind becomes NaN, so the loss
and every gradient are NaN), so the compiled step is exactly the one every other run of the
fault tests uses: they share one persistent compilation cache.
"""

import pathlib
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import train  # pylint: disable=wrong-import-position  # defines the trainer's flags

_NAN_STEPS = flags.DEFINE_list("nan_steps", [], "Steps whose batch gets a NaN MLM weight.")


def _poison_steps(steps: set[int]) -> None:
  from data_pipelines import features as F  # pylint: disable=g-import-not-at-top
  from x2vlm_jax import train_data  # pylint: disable=g-import-not-at-top

  original = train_data.DataStreams.next

  def poisoned(self, step):
    batch, choice = original(self, step)
    if step in steps:
      fields = batch[next(iter(batch))]
      w = np.array(fields[F.MLM_WEIGHTS], copy=True)
      w[0, 0] = np.nan
      fields[F.MLM_WEIGHTS] = w
    return batch, choice

  train_data.DataStreams.next = poisoned


def main(argv):
  _poison_steps({int(s) for s in _NAN_STEPS.value})
  train.main(argv)


if __name__ == "__main__":
  app.run(main)
