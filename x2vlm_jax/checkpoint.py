"""Checkpointing: an orbax `CheckpointManager` wrapper with integrity checks.

Each saved step holds four items, written together and committed atomically by orbax:

  state      the train-state pytree (params, optimizer state, step, PRNG key data, ...)
  data_iter  the data-iterator state, a JSON dict with one entry per data kind
  config     the run config as JSON (to refuse a resume whose critical settings changed)
  checksums  per-leaf shape, dtype and a 64-bit fingerprint of the leaf's bits (checksums.py)

Orbax writes a step into a temporary directory and renames it only after every item has been
written (`AtomicRenameTemporaryPath`), so a crash mid-save leaves an uncommitted
`<step>.orbax-checkpoint-tmp-*` directory that is never listed as a step; `restore` additionally
verifies checksums and falls back to the previous step when the latest one is corrupt or
unreadable.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_policies

from x2vlm_jax.checksums import leaf_checksums, leaf_name, leaf_names, verify_checksums

STATE, DATA_ITER, CONFIG, CHECKSUMS = "state", "data_iter", "config", "checksums"
CKPT_DIR = "checkpoints"  # where a training workdir keeps its steps
_CHECKSUM_FORMAT = 1


class CheckpointError(RuntimeError):
  """No checkpoint could be restored (all candidates missing, unreadable or corrupt)."""


class ConfigChangedError(ValueError):
  """A critical run setting differs between the saved checkpoint and the new run."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `CheckpointManager.restore` returns.

  Attributes:
    step: the step that was restored.
    state: the train-state pytree, laid out like the restore target.
    data_iter: the data-iterator state dict saved with that step.
    config: the run config (JSON dict) saved with that step.
    skipped: one line per newer step that was rejected (unreadable or corrupt), newest first.
  """

  step: int
  state: Any
  data_iter: dict
  config: dict
  skipped: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------
# Config handling.


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


def _flatten(d, prefix: str = "") -> dict[str, Any]:
  out = {}
  if isinstance(d, Mapping):
    for k, v in d.items():
      key = f"{prefix}.{k}" if prefix else str(k)
      if isinstance(v, Mapping) and v:
        out.update(_flatten(v, key))
      else:
        out[key] = v
  return out


def check_config_compatible(
  saved_cfg, new_cfg, critical_keys: Sequence[str], allow_config_change: bool = False
) -> list[str]:
  """Refuses to resume when a critical setting changed.

  Args:
    saved_cfg: the config stored in the checkpoint (dict or ConfigDict).
    new_cfg: the config of the run that wants to resume.
    critical_keys: dotted keys; each covers itself and every key nested below it.
    allow_config_change: if True, differences are logged as a warning instead of raising.

  Returns:
    One line per differing critical key ('key: old -> new'); empty when compatible.

  Raises:
    ConfigChangedError: listing every differing key with its old and new value.
  """
  old, new = _flatten(to_jsonable(saved_cfg)), _flatten(to_jsonable(new_cfg))

  def critical(key):
    return any(key == c or key.startswith(c + ".") for c in critical_keys)

  missing = object()
  diffs = []
  for key in sorted(k for k in set(old) | set(new) if critical(k)):
    a, b = old.get(key, missing), new.get(key, missing)
    if a != b:
      fmt = lambda v: "<absent>" if v is missing else json.dumps(v)
      diffs.append(f"{key}: {fmt(a)} -> {fmt(b)}")
  if diffs:
    msg = "critical config settings differ from the checkpoint:\n  " + "\n  ".join(diffs)
    if not allow_config_change:
      raise ConfigChangedError(msg + "\npass allow_config_change=True to resume anyway")
    logging.warning("%s\n(allowed by allow_config_change=True)", msg)
  return diffs


# ----------------------------------------------------------------------------------------------
# Targets.


def abstract_target(tree, shardings=None):
  """Turns a pytree of arrays into ShapeDtypeStructs, optionally with new shardings.

  Args:
    tree: concrete arrays or ShapeDtypeStructs (numpy arrays and python scalars are kept).
    shardings: None (keep each jax array's sharding), one `jax.sharding.Sharding` for every array
      leaf, or a pytree of shardings matching `tree`.
  """

  def one(x, s):
    # numpy leaves stay numpy (host-side values such as counters; orbax restores them as numpy,
    # and a 64-bit numpy leaf must not become a 32-bit jax array when x64 is off).
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
      s = s if s is not None else getattr(x, "sharding", None)
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return x

  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), tree)
  return jax.tree.map(one, tree, shardings)


def _target_dtypes(target) -> dict[str, str]:
  """Leaf name -> dtype requested by a restore target (leaves without a dtype are left out)."""
  if target is None:
    return {}
  flat, _ = jax.tree_util.tree_flatten_with_path(target)
  return {leaf_name(p): str(np.dtype(x.dtype)) for p, x in flat if hasattr(x, "dtype")}


# ----------------------------------------------------------------------------------------------
# The manager.


class CheckpointManager:
  """Saves and restores train state + data-iterator state + config + checksums with orbax.

  Args:
    directory: where step directories are written (local path or any epath URL).
    max_to_keep: keep the newest N committed steps.
    keep_every: additionally keep forever every step divisible by K (None: no such steps).
    async_save: `save` returns once arrays are copied to host; writing continues in background.
    save_interval_steps: orbax only saves steps divisible by this (unless `force=True`).
    read_only: only read (another run's checkpoints, possibly still being written): nothing is
      saved, deleted or cleaned up (a running save's temporary directory is left alone).
  """

  def __init__(
    self,
    directory,
    *,
    max_to_keep: int | None = 3,
    keep_every: int | None = None,
    async_save: bool = True,
    save_interval_steps: int = 1,
    read_only: bool = False,
  ):
    policies = [ocp_policies.LatestN(n=max_to_keep)]
    if keep_every:
      policies.append(ocp_policies.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps,
      preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      # Left-over '<step>.orbax-checkpoint-tmp-*' directories of a crashed save are removed.
      cleanup_tmp_directories=True,
    )
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    self.directory = directory
    self._mgr = ocp.CheckpointManager(
      directory,
      options=options,
      item_handlers={
        STATE: ocp.StandardCheckpointHandler(),
        DATA_ITER: ocp.JsonCheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
        CHECKSUMS: ocp.JsonCheckpointHandler(),
      },
    )

  # -- saving ---------------------------------------------------------------------------------

  def save(
    self,
    step: int,
    state,
    *,
    data_iter: Mapping[str, Any] | None = None,
    config=None,
    force: bool = False,
  ) -> bool:
    """Starts saving `step`; returns whether a save was started (see `save_interval_steps`).

    Args:
      step: the train step the state belongs to.
      state: pytree of jax/numpy arrays and scalars (PRNG keys as `jax.random.key_data`).
      data_iter: JSON-serialisable iterator state, e.g. {'image': {...}, 'region': {...}}.
      config: the run config (ConfigDict, dataclass or dict); stored as JSON.
      force: save even if `step` is not on the save interval.
    """
    if not force and not self._mgr.should_save(step):
      return False
    data_iter = dict(data_iter or {})
    for kind, value in data_iter.items():
      try:
        json.dumps(value)
      except (TypeError, ValueError) as e:
        raise TypeError(f"data-iterator state of {kind!r} is not JSON-serialisable: {e}") from e
    checksums = {"format": _CHECKSUM_FORMAT, "leaves": leaf_checksums(state)}
    return self._mgr.save(
      step,
      args=ocp.args.Composite(
        **{
          STATE: ocp.args.StandardSave(state),
          DATA_ITER: ocp.args.JsonSave(data_iter),
          CONFIG: ocp.args.JsonSave(to_jsonable(config if config is not None else {})),
          CHECKSUMS: ocp.args.JsonSave(checksums),
        }
      ),
      force=force,
    )

  def wait_until_finished(self):
    """Blocks until every pending async save is written and committed."""
    self._mgr.wait_until_finished()

  # -- listing --------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (uncommitted tmp directories are never listed)."""
    self._mgr.reload()
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def saved_config(self, step: int | None = None) -> dict:
    """The config stored with `step` (default: latest), without restoring any arrays."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no committed checkpoint in {self.directory}")
    out = self._mgr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
    return out[CONFIG]

  # -- restoring ------------------------------------------------------------------------------

  def _read_state(self, step: int, target, partial: bool) -> tuple[Any, dict, dict, dict]:
    """(state, data_iter, config, checksums) of one step; `partial` reads only `target`'s leaves."""
    if not partial:
      out = self._mgr.restore(
        step,
        args=ocp.args.Composite(
          **{
            STATE: ocp.args.StandardRestore(target),
            DATA_ITER: ocp.args.JsonRestore(),
            CONFIG: ocp.args.JsonRestore(),
            CHECKSUMS: ocp.args.JsonRestore(),
          }
        ),
      )
      return out[STATE], out[DATA_ITER], out[CONFIG], out[CHECKSUMS]
    # A sub-tree of the state (e.g. the parameters without the optimizer moments): orbax's
    # PyTree handler reads only the named arrays, straight into the target's shardings.
    meta = self._mgr.restore(
      step,
      args=ocp.args.Composite(
        **{CONFIG: ocp.args.JsonRestore(), CHECKSUMS: ocp.args.JsonRestore()}
      ),
    )
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
      state = ckptr.restore(
        epath.Path(self.directory) / str(step) / STATE,
        args=ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True,
        ),
      )
    finally:
      ckptr.close()
    return state, {}, meta[CONFIG], meta[CHECKSUMS]

  def _restore_one(
    self, step: int, target, verify: bool, partial: bool = False
  ) -> tuple[Restored | None, str | None]:
    """Restores and verifies one step; returns (result, None) or (None, why it was rejected)."""
    try:
      state, data_iter, config, sums = self._read_state(step, target, partial)
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
      return None, f"step {step} is unreadable: {type(e).__name__}: {str(e)[:500]}"
    if verify:
      sums = sums or {}
      if sums.get("format") != _CHECKSUM_FORMAT or "leaves" not in sums:
        return None, f"step {step} has no usable checksums (format {sums.get('format')!r})"
      expected = sums["leaves"]
      if partial:  # only the leaves that were read
        names = set(leaf_names(state))
        expected = {k: v for k, v in expected.items() if k in names}
      problems = verify_checksums(state, expected, _target_dtypes(target))
      if problems:
        return None, f"step {step} is corrupt: " + "; ".join(problems[:10]) + (
          f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
        )
    return Restored(
      step=step, state=state, data_iter=dict(data_iter or {}), config=dict(config or {})
    ), None

  def restore(
    self,
    target=None,
    *,
    step: int | None = None,
    verify: bool = True,
    fallback: bool = True,
    config=None,
    critical_keys: Sequence[str] = (),
    allow_config_change: bool = False,
    partial: bool = False,
  ) -> Restored:
    """Restores the latest good committed step (or exactly `step`).

    Args:
      target: the restore target: a pytree like the saved state whose array leaves are
        `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` (see `abstract_target`); arrays are
        placed straight onto those shardings, so another mesh or device count is fine. None
        restores with the saved layout (same topology only).
      step: restore this step only (no fallback); default: newest committed step.
      verify: check the per-leaf checksums after reading.
      fallback: if the newest step is unreadable or corrupt, try older steps (newest first).
      config: if given, `check_config_compatible(saved, config, critical_keys)` is enforced.
      critical_keys, allow_config_change: passed to `check_config_compatible`.
      partial: `target` names a sub-tree of the saved state (e.g. {'train': {'params': ...}});
        only those arrays are read and verified, and `data_iter` comes back empty.

    Raises:
      CheckpointError: no committed step, or every candidate step was rejected.
      ConfigChangedError: the restored step's config differs in a critical key.
    """
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise CheckpointError(
          f"step {step} is not a committed checkpoint in {self.directory} (committed: {steps})"
        )
      candidates = [step]
    else:
      candidates = sorted(steps, reverse=True)
      if not fallback:
        candidates = candidates[:1]
    if not candidates:
      raise CheckpointError(f"no committed checkpoint in {self.directory}")
    skipped = []
    for s in candidates:
      result, why = self._restore_one(s, target, verify, partial)
      if result is not None:
        if skipped:
          logging.warning(
            "restored step %d after rejecting newer steps:\n  %s", s, "\n  ".join(skipped)
          )
        result = dataclasses.replace(result, skipped=tuple(skipped))
        if config is not None:
          check_config_compatible(result.config, config, critical_keys, allow_config_change)
        return result
      logging.error("checkpoint rejected: %s", why)
      skipped.append(why)
    raise CheckpointError(
      f"no restorable checkpoint in {self.directory}:\n  " + "\n  ".join(skipped)
    )

  def close(self):
    """Waits for pending saves and releases orbax resources."""
    self._mgr.wait_until_finished()
    self._mgr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
