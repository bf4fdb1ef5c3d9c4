"""Layout transforms between a foreign tensor and one of our (per-layer) tensors.

Each `Transform` knows both directions and the foreign shape that corresponds to ours, so a
converter's rule table (`common.Rule`) can import, export and report a shape mismatch by name
before any reshape fails. Pure NumPy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
  """A lossless re-layout between a foreign tensor and one of our (per-layer) tensors.

  `to_ours(x, shape)` gets the foreign array and our target shape (per layer); `to_foreign(y)`
  is its inverse; `foreign_shape(shape)` is the foreign shape that corresponds to our shape, used
  to report a mismatch by name before any reshape can fail.
  """

  name: str
  to_ours: Callable[[np.ndarray, Shape], np.ndarray]
  to_foreign: Callable[[np.ndarray], np.ndarray]
  foreign_shape: Callable[[Shape], Shape]


IDENTITY = Transform("identity", lambda x, s: x, lambda y: y, lambda s: tuple(s))

# PyTorch nn.Linear weight (out, in) <-> Flax kernel [in, out].
LINEAR = Transform("linear", lambda x, s: x.T, lambda y: y.T, lambda s: (s[1], s[0]))

# Conv weight (O, I, kH, kW) <-> Flax conv kernel [kH, kW, I, O].
CONV_OIHW = Transform(
  "conv_oihw",
  lambda x, s: x.transpose(2, 3, 1, 0),
  lambda y: y.transpose(3, 2, 0, 1),
  lambda s: (s[3], s[2], s[0], s[1]),
)

# Linear (H*dh, in) <-> [in, H, dh]: projections into heads (q/k/v); heads are contiguous row
# blocks of dh output features in PyTorch (docs/fidelity.md#weight-layouts).
LINEAR_TO_HEADS = Transform(
  "linear_to_heads",
  lambda x, s: x.T.reshape(s),
  lambda y: y.reshape(y.shape[0], -1).T,
  lambda s: (math.prod(s[1:]), s[0]),
)

# Bias (H*dh,) <-> [H, dh] (also BEiT q_bias / v_bias).
BIAS_TO_HEADS = Transform(
  "bias_to_heads",
  lambda x, s: x.reshape(s),
  lambda y: y.reshape(-1),
  lambda s: (math.prod(s),),
)

# Linear (out, H*dh) <-> [H, dh, out]: the attention output projection.
LINEAR_FROM_HEADS = Transform(
  "linear_from_heads",
  lambda x, s: x.T.reshape(s),
  lambda y: y.reshape(-1, y.shape[-1]).T,
  lambda s: (s[-1], math.prod(s[:-1])),
)

# BEiT fused qkv weight (3*H*dh, in), rows [q; k; v] each with heads contiguous <-> [in, 3, H, dh]
# (docs/fidelity.md#weight-layouts). Same algebra as LINEAR_TO_HEADS with the q/k/v selector as
# the outer axis.
FUSED_QKV = Transform(
  "fused_qkv",
  lambda x, s: x.T.reshape(s),
  lambda y: y.reshape(y.shape[0], -1).T,
  lambda s: (math.prod(s[1:]), s[0]),
)


def reshape_transform(name: str, foreign_shape: Callable[[Shape], Shape]) -> Transform:
  """A pure reshape, e.g. the frame embedding (1, F, 1, D) <-> [F, D]."""
  return Transform(
    name,
    lambda x, s: x.reshape(s),
    lambda y: y.reshape(foreign_shape(y.shape)),
    foreign_shape,
  )


def split_heads(x: np.ndarray, num_heads: int, axis: int = -1) -> np.ndarray:
  """Splits one axis of size H*dh into (H, dh), heads outermost (PyTorch's contiguous layout)."""
  axis = axis % x.ndim
  size = x.shape[axis]
  if size % num_heads:
    raise ValueError(f"axis {axis} of size {size} is not divisible by {num_heads} heads")
  return x.reshape(x.shape[:axis] + (num_heads, size // num_heads) + x.shape[axis + 1 :])


def join_heads(x: np.ndarray, axis: int = -2) -> np.ndarray:
  """Inverse of `split_heads`: merges axes (axis, axis+1) = (H, dh) into one of size H*dh."""
  axis = axis % x.ndim
  return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def stack_layers(per_layer: Sequence[np.ndarray]) -> np.ndarray:
  """Per-layer tensors -> one `[depth, ...]` array (the scanned-tower layout)."""
  shapes = {a.shape for a in per_layer}
  if len(shapes) != 1:
    raise ValueError(f"cannot stack layers of different shapes {sorted(shapes)}")
  return np.stack(per_layer, axis=0)


def unstack_layers(stacked: np.ndarray) -> list[np.ndarray]:
  """`[depth, ...]` -> list of per-layer arrays (views, no copy)."""
  return [stacked[i] for i in range(stacked.shape[0])]
