"""Official X2-VLM weights as safetensors, in the official key names (no pickle, no torch).

PyTorch users load the file with `safetensors.torch.load_file` and
`model.load_state_dict(sd, strict=True)`. safetensors refuses tensors that share memory, so the
two tied MLM-decoder entries (`cls.predictions.decoder.weight` / `.bias`) are
stored as separate copies with identical values; loading them into the official module re-ties
nothing by itself, but the values are equal so the tie holds. The checkpoint's config dict is
kept as JSON in the file's metadata under `config`. See docs/fidelity.md#tied-decoder-entries.
"""

from __future__ import annotations

import collections
import json
import pathlib
from collections.abc import Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from x2vlm_jax import paths
from x2vlm_jax.convert.arrays import to_numpy

CONFIG_KEY = "config"


def save_safetensors(
  path: str | pathlib.Path, state_dict: Mapping[str, np.ndarray], config: Mapping | None = None
) -> None:
  """Writes an official state dict (numpy or torch values) with its config as JSON metadata."""
  tensors = {}
  for k, v in state_dict.items():
    arr = to_numpy(v, k)
    if arr.dtype not in (np.float32, np.int64):
      raise TypeError(f"{k}: dtype {arr.dtype}; official checkpoints hold float32 and int64 only")
    # Separate, contiguous copies: tied entries must not alias (safetensors rejects shared memory).
    tensors[k] = np.array(arr, order="C", copy=True)
  metadata = {
    "format": "pt",
    CONFIG_KEY: json.dumps(dict(config or {}), sort_keys=True, default=str),
  }
  # Bytes written through epath, so a gs://... export lands in the bucket.
  paths.path(path).write_bytes(save(tensors, metadata=metadata))


def load_safetensors(
  path: str | pathlib.Path,
) -> tuple["collections.OrderedDict[str, np.ndarray]", dict | None]:
  """Reads (state dict of numpy arrays, config dict or None). Keys come back in file order."""
  sd = collections.OrderedDict()
  with safe_open(str(path), framework="numpy") as f:
    meta = f.metadata() or {}
    for k in f.keys():
      sd[k] = f.get_tensor(k)
  config = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
  return sd, config
