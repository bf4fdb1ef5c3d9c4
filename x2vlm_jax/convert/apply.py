"""The model side of every importer: the parameters a model expects, and writing loaded ones in.

The Hugging Face tower importers (`hf.load_bert` / `hf_beit.load_beit`) and the official `.th` /
safetensors import (`official.official_to_params`) all produce a nested dict of numpy arrays in
our parameter layout. `apply_params` writes such dicts into a model, keeping each parameter's
dtype and sharding, and returns the paths left at init -- the official `init_params`, which the
optimizer gives lr x lr_mult (docs/fidelity.md#learning-rate-multiplier-for-fresh-parameters).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from x2vlm_jax import treepath
from x2vlm_jax.convert import common as C
from x2vlm_jax.models.config import ModelConfig


def expected_shapes(model_cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{dotted path: (shape, dtype)} of every parameter, via `nnx.eval_shape` of the model."""
  from flax import nnx

  from x2vlm_jax.models.x2vlm import abstract_model

  state = nnx.state(abstract_model(model_cfg), nnx.Param)
  return {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in treepath.flatten_state(state).items()}


def apply_params(model, *params: Mapping[str, Any]) -> frozenset[str]:
  """Writes nested dicts of loaded arrays into `model` in place (same dtype and sharding as its
  params) and returns the dotted paths of every model parameter that none of them holds.

  Host arrays are placed onto the parameter's sharding; jax arrays stay on the devices (cast and
  resharded there if needed; already in place, e.g. restored into the model's shardings, they are
  used as they are), so no process needs to address a whole parameter."""
  import jax
  from flax import nnx

  state = nnx.state(model, nnx.Param)
  current = treepath.flatten_state(state)
  pure = nnx.to_pure_dict(state)
  loaded: set[str] = set()
  for tree in params:
    for path, arr in treepath.flatten_dict(tree).items():
      if path not in current:
        raise C.ConversionError(f"{path}: not a parameter of this model")
      old = current[path][...]
      if tuple(arr.shape) != tuple(old.shape):
        raise C.ConversionError(f"{path}: loaded shape {arr.shape} vs model {old.shape}")
      if isinstance(arr, jax.Array):
        new = jax.device_put(arr if arr.dtype == old.dtype else arr.astype(old.dtype), old.sharding)
      else:
        new = jax.device_put(np.asarray(arr, dtype=old.dtype), old.sharding)
      treepath.set_path(pure, path, new)
      loaded.add(path)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return frozenset(current) - loaded
