"""Helpers for tests and benchmarks only; nothing in the training or evaluation pipeline imports
them.

  faults        copies a clean JSON-lines set with known faults injected (one skip reason each)
  random_batch  random MixedBatches with the exact spec of `features.batch_spec`
"""
