"""Host-side (NumPy) steps of MVPTR's masked-concept reconstruction (docs/mvptr.md#objectives).

- `mask_concepts`: corrupt concept ids (tags or phrases) BERT-style: each real slot is chosen
  with probability `rate` (paper 0.25; the code's tag masking uses 0.15), then [MASK] 80 %,
  a random concept 10 %, kept 10 %. Labels are the original ids at chosen slots, -1 elsewhere.
- `hungarian_targets`: the paper's label assignment. Concepts are an unordered set, so the model
  is not asked to say *which* masked slot held which concept: per example, the masked slots
  and the masked concepts are matched by `scipy.optimize.linear_sum_assignment` minimising
  sum(1 - p(slot, concept)), on stop-gradient probabilities outside `jit`, and the matched
  concept becomes the slot's CE label (`mvptr_losses.mcr_loss`). The training step uses the
  in-graph twin `mvptr_assign.hungarian_targets`; this host version is its reference in tests.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def mask_concepts(rng: np.random.Generator, ids, valid, *, rate: float, mask_id: int, vocab):
  """ids, valid [B, T] -> (corrupted ids, labels) [B, T]; `vocab` = (low, high) of the ids a
  random replacement is drawn from."""
  ids = np.asarray(ids)
  valid = np.asarray(valid) > 0
  if ids.shape != valid.shape:
    raise ValueError(f"mask_concepts: ids {ids.shape} and valid {valid.shape} differ")
  chosen = valid & (rng.random(ids.shape) < rate)
  labels = np.where(chosen, ids, -1)
  roll = rng.random(ids.shape)
  out = np.where(chosen & (roll < 0.8), mask_id, ids)
  random_ids = rng.integers(vocab[0], vocab[1], ids.shape)
  out = np.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, out)
  return out, labels


def hungarian_targets(probs, labels):
  """probs [B, T, V] (softmax over the concept vocabulary at every slot, stop-gradient host
  copy), labels [B, T] (original concept at masked slots, -1 elsewhere) -> [B, T] labels with
  each example's masked concepts re-assigned to its masked slots at minimum total 1 - p."""
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  if probs.shape[:2] != labels.shape:
    raise ValueError(f"hungarian_targets: probs {probs.shape} do not fit labels {labels.shape}")
  out = np.full_like(labels, -1)
  for b in range(labels.shape[0]):
    slots = np.flatnonzero(labels[b] >= 0)
    if slots.size == 0:
      continue
    concepts = labels[b, slots]
    if concepts.max() >= probs.shape[-1]:
      raise ValueError(f"hungarian_targets: example {b} has concept id {concepts.max()} >= V")
    cost = 1.0 - probs[b][np.ix_(slots, concepts)]  # [slot, concept]
    rows, cols = linear_sum_assignment(cost)
    out[b, slots[rows]] = concepts[cols]
  return out
