"""What a resume compares before any array of a checkpoint is read: the saved run config against
the new one, and the saved leaf shapes against the restore target.

  critical keys   a difference refuses the resume (`ConfigChangedError` with the diff) unless
                  `allow_config_change`; e.g. the model section, batch sizes, data sources, seed
  stream keys     a difference is allowed but printed as a warning: the resumed run reads its
                  examples differently (e.g. data.max_tokens, the masking settings)
  leaf shapes     the per-leaf shapes saved with the checksums against the target's: a
                  difference can never be restored, so it is refused even when config changes
                  are allowed, naming the leaves

Derived entries of a saved config (keys starting with '_', e.g. '_model_resolved': the model
config after `text_config_from` and the variant table are applied) are compared only when both
configs have them, so checkpoints written before such an entry existed still resume.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from x2vlm_jax.checksums import leaf_name


class ConfigChangedError(ValueError):
  """A critical run setting differs between the saved checkpoint and the new run."""


def to_jsonable(obj, where: str = "config"):
  """Converts a config (ConfigDict, dataclass, dict, tuples, numpy scalars) to plain JSON."""
  if hasattr(obj, "to_dict") and callable(obj.to_dict):
    obj = obj.to_dict()
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    obj = dataclasses.asdict(obj)
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v, f"{where}.{k}") for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  # Callables, classes, ...: recorded by repr so the saved config stays readable and comparable.
  return repr(obj)


def flatten(d, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1} (empty dicts stay as values)."""
  out = {}
  if isinstance(d, Mapping):
    for k, v in d.items():
      key = f"{prefix}.{k}" if prefix else str(k)
      if isinstance(v, Mapping) and v:
        out.update(flatten(v, key))
      else:
        out[key] = v
  return out


def _under(key: str, prefixes: Sequence[str]) -> bool:
  return any(key == c or key.startswith(c + ".") for c in prefixes)


def config_diff(saved_cfg, new_cfg, keys: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
  """'key: old -> new' for every differing key under `keys` and not under `exclude`."""
  old, new = flatten(to_jsonable(saved_cfg)), flatten(to_jsonable(new_cfg))
  missing = object()
  fmt = lambda v: "<absent>" if v is missing else json.dumps(v)
  diffs = []
  for key in sorted(k for k in set(old) | set(new) if _under(k, keys) and not _under(k, exclude)):
    a, b = old.get(key, missing), new.get(key, missing)
    if key.startswith("_") and missing in (a, b):
      continue  # a derived entry one side predates
    if a != b:
      diffs.append(f"{key}: {fmt(a)} -> {fmt(b)}")
  return diffs


def check_config_compatible(
  saved_cfg,
  new_cfg,
  critical_keys: Sequence[str],
  allow_config_change: bool = False,
  free_keys: Sequence[str] = (),
) -> list[str]:
  """Refuses to resume when a critical setting changed.

  Args:
    saved_cfg: the config stored in the checkpoint (dict or ConfigDict).
    new_cfg: the config of the run that wants to resume.
    critical_keys: dotted keys; each covers itself and every key nested below it.
    allow_config_change: if True, differences are logged as a warning instead of raising.
    free_keys: keys under `critical_keys` that may change (how the step computes, not what).

  Returns:
    One line per differing critical key ('key: old -> new'); empty when compatible.

  Raises:
    ConfigChangedError: listing every differing key with its old and new value.
  """
  diffs = config_diff(saved_cfg, new_cfg, critical_keys, free_keys)
  if diffs:
    msg = "critical config settings differ from the checkpoint:\n  " + "\n  ".join(diffs)
    if not allow_config_change:
      raise ConfigChangedError(msg + "\npass allow_config_change=True to resume anyway")
    logging.warning("%s\n(allowed by allow_config_change=True)", msg)
  return diffs


@dataclasses.dataclass(frozen=True)
class ConfigCheck:
  """The check a resume runs on a verified step's saved config, before reading any array.

  Called with the saved config (a JSON dict); raises `ConfigChangedError` on a critical
  difference and returns the warnings (stream keys that changed, and allowed critical changes).

  Attributes:
    config: the new run's config (anything `to_jsonable` takes).
    critical_keys: differences refuse the resume unless `allow_config_change`.
    stream_keys: differences are warnings (they change which examples are read, not the state).
    neutral_keys: keys under `stream_keys` that do not change the examples (e.g. worker counts).
    allow_config_change: critical differences become warnings.
    free_keys: keys under `critical_keys` that may change freely (e.g. the attention
      implementation: same numbers) and may be absent from older saved configs.
  """

  config: Any
  critical_keys: tuple[str, ...]
  stream_keys: tuple[str, ...] = ()
  neutral_keys: tuple[str, ...] = ()
  allow_config_change: bool = False
  free_keys: tuple[str, ...] = ()

  def __call__(self, saved: Mapping) -> list[str]:
    allowed = check_config_compatible(
      saved, self.config, self.critical_keys, self.allow_config_change, self.free_keys
    )
    exclude = tuple(self.critical_keys) + tuple(self.neutral_keys)
    stream = config_diff(saved, self.config, self.stream_keys, exclude)
    for d in stream:
      logging.warning("resume: data stream setting changed: %s", d)
    return [f"critical setting changed (allowed): {d}" for d in allowed] + [
      f"data stream setting changed: {d}" for d in stream
    ]


def shape_problems(saved_leaves: Mapping[str, Mapping], target, partial: bool) -> list[str]:
  """Leaves whose saved shape differs from the target's, or that only one side has.

  Args:
    saved_leaves: the per-leaf checksums saved with the step ({name: {'shape', 'dtype', ...}}).
    target: the restore target (leaves with `.shape`); None = nothing to compare.
    partial: the target is a sub-tree: saved leaves it does not name are fine.
  """
  if target is None:
    return []
  flat, _ = jax.tree_util.tree_flatten_with_path(target)
  wanted = {leaf_name(p): tuple(x.shape) for p, x in flat if hasattr(x, "shape")}
  problems = []
  names = set(wanted) | (set() if partial else set(saved_leaves))
  for name in sorted(names, key=lambda n: ("opt_state" in n, n)):  # parameters first
    if name not in saved_leaves:
      problems.append(f"leaf {name!r}: not in the checkpoint")
    elif name not in wanted:
      problems.append(f"leaf {name!r}: in the checkpoint, not in this run's state")
    elif tuple(saved_leaves[name].get("shape", ())) != wanted[name]:
      saved = list(saved_leaves[name].get("shape", ()))
      problems.append(f"leaf {name!r}: shape {saved} in the checkpoint, {list(wanted[name])} here")
  return problems
