"""Host arrays for every converter: torch tensors and array-likes -> numpy, without torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def to_numpy(value: Any, key: str = "?") -> np.ndarray:
  """A torch tensor (any device, bf16 included) or array-like -> numpy, without importing torch."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor
    t = value.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      raise TypeError(f"{key}: bfloat16 tensors are not an official dtype; cast to float32 first")
    return t.numpy()
  try:
    return np.asarray(value)
  except Exception as e:  # pragma: no cover - exotic inputs
    raise TypeError(f"{key}: cannot convert {type(value).__name__} to a numpy array") from e


def to_numpy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
  """A nested dict of arrays (jax, numpy, ...) -> the same nesting of numpy arrays."""
  return {k: to_numpy_tree(v) if isinstance(v, Mapping) else np.asarray(v) for k, v in tree.items()}
