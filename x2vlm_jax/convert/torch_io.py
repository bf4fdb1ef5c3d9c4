"""Reading and writing official `.th` checkpoints (`torch.save` pickles).

Format: docs/fidelity.md#checkpoint-file-format.

torch is optional for the project: it is imported only inside these functions, with a clear
message when it is missing. Writing reproduces what the official code saves: `{'model':
state_dict, 'config': dict}`, float32 parameters, int64 buffers, and the tied MLM decoder
entries sharing storage with the word embeddings / prediction bias, exactly as
`module.state_dict()` returns them, so `load_state_dict(strict=True)` of the official module
accepts the file.
"""

from __future__ import annotations

import collections
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from x2vlm_jax import paths
from x2vlm_jax.convert.arrays import to_numpy
from x2vlm_jax.convert.official_spec import TIED


def _torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      "reading/writing .th checkpoints needs PyTorch: `pip install torch` "
      "(or the project's `torch` extra); safetensors files need no torch"
    ) from e
  return torch


def _plain(obj: Any) -> Any:
  """YAML-loaded configs (ruamel maps, tuples) -> plain dicts/lists/scalars."""
  if isinstance(obj, Mapping):
    return {str(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  return str(obj)


def load_th(
  path: str | pathlib.Path, weights_only: bool | None = None
) -> tuple["collections.OrderedDict[str, np.ndarray]", dict | None, list[str]]:
  """Reads a torch pickle -> (numpy state dict, config or None, notes).

  Accepts `{'model': sd, 'config': cfg}` (official checkpoints), a sub-dict under 'module' or
  'state_dict' (BEiT `.pth`, other trainers), or a bare state dict. With `weights_only=None` it
  tries `torch.load(weights_only=True)` first (no arbitrary code runs) and only if that fails --
  typically because an embedded YAML config holds non-plain objects -- retries with
  `weights_only=False`, saying so in the notes: do that only for files you trust.
  """
  torch = _torch()
  notes: list[str] = []
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=weights_only is not False)
  except FileNotFoundError:
    raise
  except Exception as e:  # pickle refused by the safe unpickler
    if weights_only:
      raise
    notes.append(
      f"weights_only=True failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
      "re-read with weights_only=False (full unpickling: trusted files only)"
    )
    obj = torch.load(str(path), map_location="cpu", weights_only=False)
  if not isinstance(obj, Mapping):
    raise ValueError(
      f"{path}: expected a dict (state dict or {{'model': ..., 'config': ...}}), "
      f"got {type(obj).__name__}"
    )
  config, sd = None, obj
  for wrapper in ("model", "module", "state_dict"):
    if isinstance(obj.get(wrapper), Mapping):
      sd, config = obj[wrapper], obj.get("config")
      extra = sorted(set(obj) - {wrapper, "config"})
      if extra:
        notes.append(f"ignored top-level entries {extra}")
      break
  non_tensors = [k for k, v in sd.items() if not hasattr(v, "shape")]
  if non_tensors:
    raise ValueError(
      f"{path}: entries {non_tensors[:5]} are not tensors; top-level keys "
      f"{sorted(obj)[:10]} do not look like an X2-VLM checkpoint"
    )
  out = collections.OrderedDict((k, to_numpy(v, k)) for k, v in sd.items())
  return out, (_plain(config) if config is not None else None), notes


def save_th(
  path: str | pathlib.Path, state_dict: Mapping[str, np.ndarray], config: Mapping | None = None
) -> None:
  """Writes `{'model': sd, 'config': config}` with official dtypes and tied storage.

  Each tied duplicate name (`TIED`) becomes a view of its primary tensor (same storage), after
  checking the values really are identical.
  """
  torch = _torch()
  tensors: dict[str, Any] = collections.OrderedDict()
  for k, v in state_dict.items():
    if k in TIED and TIED[k] in state_dict:
      continue  # linked below, once the primary exists
    arr = np.asarray(v)
    if arr.dtype not in (np.float32, np.int64):
      raise TypeError(f"{k}: dtype {arr.dtype}; official checkpoints hold float32 and int64 only")
    # np.array(copy) gives torch a writable, contiguous, owned buffer (0-d stays 0-d).
    tensors[k] = torch.from_numpy(np.array(arr, order="C", copy=True))
  out = collections.OrderedDict()
  for k in state_dict:
    if k in TIED and TIED[k] in state_dict:
      primary = tensors[TIED[k]]
      if not np.array_equal(np.asarray(state_dict[k]), primary.numpy()):
        raise ValueError(f"{k} is tied to {TIED[k]} but the values differ")
      out[k] = primary.detach()  # a new tensor object on the same storage, like state_dict()
    else:
      out[k] = tensors[k]
  with paths.path(path).open("wb") as f:  # epath: a gs://... export lands in the bucket
    torch.save({"model": out, "config": _plain(dict(config or {}))}, f)
