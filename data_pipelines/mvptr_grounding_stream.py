"""The training stream of MVPTR phrase-grounding fine-tuning (task `mvptr_grounding`,
docs/mvptr.md#fine-tuning): one row per grounded phrase of an Oscar layout with grounding
targets (the synthetic world's or the region converter's), built once in memory
(`mvptr_stream.heldout_arrays` unmasked rows -> `mvptr_grounding_file.grounding_targets` ->
`mvptr_finetune_examples.grounding_rows`), then batches of a fresh permutation per epoch.

The rows are a pure function of the layout, and the batch at a position a pure function of
(seed, process, position), so the state is the position alone: restoring it reproduces the
remaining batches bit for bit. Process `i` of `n` reads rows i, i + n, ... of the table.
Interface of `mvptr_stream.MvptrIterator` as `train_data.MvptrStreams` uses it.
"""

from __future__ import annotations

import numpy as np

from data_pipelines import mvptr_finetune_examples as FE
from data_pipelines import mvptr_stream
from data_pipelines.mixture import seed32
from data_pipelines.mvptr_examples import MvptrExampleSpec
from data_pipelines.mvptr_grounding_file import grounding_targets

STATE_VERSION = 1


def grounding_table(source, spec: MvptrExampleSpec) -> tuple[dict[str, np.ndarray], dict]:
  """Every grounded phrase of `source` as one row (`grounding_rows` fields + image_id); with
  the skip counts of the records left out."""
  rows, skips = mvptr_stream.heldout_arrays(source, spec)
  targets = grounding_targets(source, spec.max_phrases)[rows["index"]]
  table = FE.grounding_rows(rows, targets)
  n, _ = np.nonzero((targets >= 0) & (np.asarray(rows["phrase_valid"]) > 0))  # as grounding_rows
  table["image_id"] = np.asarray(rows[mvptr_stream.IMAGE_ID])[n]
  return table, skips


class GroundingBatches:
  """Endless batches of `batch_size` rows of a table (module docstring)."""

  def __init__(self, table, batch_size: int, seed: int, process_index: int, process_count: int):
    mine = {k: np.asarray(v)[process_index::process_count] for k, v in table.items()}
    self.rows = next(iter(mine.values())).shape[0]
    if self.rows < batch_size:
      raise ValueError(
        f"grounding fine-tuning: {self.rows} phrase rows for process {process_index}, fewer than "
        f"its batch of {batch_size}"
      )
    self.table, self.batch_size = mine, int(batch_size)
    self.seed, self.process_index, self.position = int(seed), int(process_index), 0

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed32(self.seed), self.process_index, epoch]).permutation(
      self.rows
    )

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    per_epoch = self.rows // self.batch_size  # the last partial batch of an epoch is dropped
    epoch, k = divmod(self.position, per_epoch)
    take = self._order(epoch)[k * self.batch_size : (k + 1) * self.batch_size]
    self.position += 1
    return {name: a[take] for name, a in self.table.items()}

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "position": self.position, "rows": self.rows}

  def set_state(self, state: dict) -> None:
    if state.get("version") != STATE_VERSION or state.get("rows") != self.rows:
      raise ValueError(
        f"saved grounding stream state {state} does not fit this stream ({self.rows} rows)"
      )
    self.position = int(state["position"])

  def skip_counts(self) -> dict[str, int]:
    return {}

  def close(self) -> None:
    """Nothing to stop: the rows are in memory."""
