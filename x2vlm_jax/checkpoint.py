"""Checkpointing: an orbax `CheckpointManager` wrapper that never restores a step it cannot vouch
for.

Each saved step holds four items, written together and committed atomically by orbax:

  state      the train-state pytree (params, optimizer state, step, PRNG key data, ...)
  data_iter  the data-iterator state, a JSON dict with one entry per process and stream
  config     the run config as JSON (to refuse a resume whose critical settings changed)
  checksums  per-leaf shape, dtype and a 64-bit fingerprint of the leaf's bits (checksums.py)

plus `x2vlm_manifest.json`, the size and SHA-256 of every file of the step, written last before
orbax's commit marker (ckpt_manifest.py). Orbax writes a step into a temporary directory and
renames it only after every item has been written, so a crash mid-save leaves an uncommitted
`<step>.orbax-checkpoint-tmp-*` directory that is never listed as a step.

A restore tries the newest step first and for each candidate:
  1. checks the marker, the manifest and every file (`ckpt_manifest.check_step`); a step that
     fails is rejected naming the file and moved aside to `<step>.corrupt-<UTC time>` (never
     deleted; not in read-only mode), so the run can write that step again;
  2. reads the JSON items and runs the config check and the leaf-shape check before any array
     is read (ckpt_config.py): a changed critical setting or shape raises, it is not corruption;
  3. reads the arrays and compares them with the per-leaf fingerprints (a mismatch: as 1).
The first step that passes is returned; rejected newer ones are listed in `Restored.skipped`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_policies
from orbax.checkpoint import multihost as ocp_multihost

from x2vlm_jax import ckpt_manifest
from x2vlm_jax.checksums import leaf_checksums, leaf_name, leaf_names, verify_checksums
from x2vlm_jax.ckpt_config import (  # re-exported: the checkpoint API callers use
  ConfigChangedError,
  check_config_compatible,
  shape_problems,
  to_jsonable,
)

__all__ = [
  "CheckpointError",
  "CheckpointManager",
  "ConfigChangedError",
  "Restored",
  "abstract_target",
  "check_config_compatible",
  "to_jsonable",
]

STATE, DATA_ITER, CONFIG, CHECKSUMS = "state", "data_iter", "config", "checksums"
CKPT_DIR = "checkpoints"  # where a training workdir keeps its steps
CORRUPT = ".corrupt-"  # a rejected step is renamed '<step>.corrupt-<UTC time>'
_CHECKSUM_FORMAT = 1
_barriers = itertools.count()


class CheckpointError(RuntimeError):
  """No checkpoint could be restored (all candidates missing, rejected), or an intact one could
  not be read into the target."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `CheckpointManager.restore` returns.

  Attributes:
    step: the step that was restored.
    state: the train-state pytree, laid out like the restore target.
    data_iter: the data-iterator state dict saved with that step.
    config: the run config (JSON dict) saved with that step.
    skipped: one line per newer step that was rejected (naming the file or leaf), newest first.
    warnings: what the config check allowed but reported (e.g. a changed data.max_tokens).
  """

  step: int
  state: Any
  data_iter: dict
  config: dict
  skipped: tuple[str, ...] = ()
  warnings: tuple[str, ...] = ()


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
      saved, deleted, moved aside or cleaned up (a running save's temporary directory is left
      alone; a rejected step is only skipped).
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
      # Orbax's commit with the manifest written just before the marker.
      temporary_path_class=ckpt_manifest.temporary_path_class(directory),
    )
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    self.directory = directory
    self.read_only = read_only
    self.async_save = async_save and not read_only
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

  # -- listing and checking -------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (uncommitted tmp directories are never listed)."""
    self._mgr.reload()
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def moved_aside(self) -> list[str]:
    """Names of the rejected steps moved aside in this directory ('12.corrupt-...')."""
    d = epath.Path(self.directory)
    return sorted(p.name for p in d.iterdir() if CORRUPT in p.name) if d.exists() else []

  def check_step(self, step: int, prefixes=None) -> ckpt_manifest.Verdict:
    """The manifest check of one committed step (`ckpt_manifest.check_step`; a collective with
    several processes when every file is checked)."""
    verdict = ckpt_manifest.check_step(self.step_dir(step), prefixes, share=prefixes is None)
    for note in verdict.notes:
      logging.warning("checkpoint step %d: %s", step, note)
    return verdict

  def latest_intact_step(self) -> int | None:
    """The newest step whose files all match its manifest, after pending saves finished."""
    self.wait_until_finished()
    for s in reversed(self.all_steps()):
      if self.check_step(s).ok:
        return s
    return None

  def saved_config(self, step: int | None = None) -> dict:
    """The config stored with `step` (default: the newest step whose marker, manifest and
    config files check out), without reading any array."""
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    problems = []
    for s in steps:
      verdict = self.check_step(s, prefixes=(CONFIG + "/",))
      if verdict.ok:
        return self._read_json(s, CONFIG)
      problems.append(f"step {s}: " + "; ".join(verdict.problems))
    raise CheckpointError(
      f"no checkpoint with an intact config in {self.directory}:\n  " + "\n  ".join(problems)
    )

  # -- restoring ------------------------------------------------------------------------------

  def _read_json(self, step: int, *items: str):
    args = ocp.args.Composite(**{k: ocp.args.JsonRestore() for k in items})
    out = self._mgr.restore(step, args=args)
    return out[items[0]] if len(items) == 1 else tuple(out[k] for k in items)

  def _read_arrays(self, step: int, target, partial: bool):
    """The state of one step; `partial` reads only `target`'s leaves."""
    if not partial:
      args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)})
      return self._mgr.restore(step, args=args)[STATE]
    # A sub-tree of the state (e.g. the parameters without the optimizer moments): orbax's
    # PyTree handler reads only the named arrays, straight into the target's shardings.
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
      return ckptr.restore(
        self.step_dir(step) / STATE,
        args=ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True,
        ),
      )
    finally:
      ckptr.close()

  def _reject(self, step: int, why: str) -> str:
    """Logs a rejected step and, unless read-only, moves it aside; returns the report line."""
    logging.error("checkpoint rejected: %s", why)
    if self.read_only:
      return why
    moved = None
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
      src = self.step_dir(step)
      for n in itertools.count():
        moved = src.parent / f"{step}{CORRUPT}{stamp}{f'-{n}' if n else ''}"
        if not moved.exists():
          break
      src.rename(moved)
      logging.warning("moved rejected checkpoint step %d aside to %s (not deleted)", step, moved)
    if jax.process_count() > 1:
      ocp_multihost.sync_global_processes(f"x2vlm_ckpt_moved_aside_{step}_{next(_barriers)}")
    self._mgr.reload()
    return why + (f"; moved aside to {moved.name}" if moved is not None else "")

  def _restore_one(self, step, target, verify, partial, check_config):
    """(Restored, None) or (None, why the step was rejected); raises on config changes and on
    an intact step that cannot be read into the target."""
    if verify:
      verdict = self.check_step(step)
      if not verdict.ok:
        return None, f"step {step} is corrupt: " + _first(verdict.problems)
    try:
      config, sums, data_iter = self._read_json(step, CONFIG, CHECKSUMS, DATA_ITER)
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
      return None, f"step {step} is unreadable: {type(e).__name__}: {str(e)[:500]}"
    config, sums = dict(config or {}), dict(sums or {})
    warnings = tuple(check_config(config)) if check_config is not None else ()
    target = target(config) if callable(target) else target
    if verify and (sums.get("format") != _CHECKSUM_FORMAT or "leaves" not in sums):
      return None, f"step {step} has no usable checksums (format {sums.get('format')!r})"
    misfit = shape_problems(sums["leaves"], target, partial) if "leaves" in sums else []
    if misfit:
      raise ConfigChangedError(
        f"the arrays of checkpoint step {step} do not fit this run's state (a changed model "
        "or optimizer; not allowed by any flag):\n  " + _first(misfit, sep="\n  ", n=20)
      )
    try:
      state = self._read_arrays(step, target, partial)
    except Exception as e:  # orbax / tensorstore raise many types
      why = f"step {step} is unreadable: {type(e).__name__}: {str(e)[:500]}"
      if verify:  # its files are intact: not a damaged step, so no fallback
        raise CheckpointError(f"{why} (its files match the manifest)") from e
      return None, why
    if verify:
      expected = sums["leaves"]
      if partial:  # only the leaves that were read
        names = set(leaf_names(state))
        expected = {k: v for k, v in expected.items() if k in names}
      problems = verify_checksums(state, expected, _target_dtypes(target))
      if problems:
        return None, f"step {step} is corrupt: " + _first(problems)
    data_iter = {} if partial else dict(data_iter or {})
    return Restored(step, state, data_iter, config, warnings=warnings), None

  def restore(
    self,
    target=None,
    *,
    step: int | None = None,
    verify: bool = True,
    fallback: bool = True,
    check_config: Callable[[dict], Sequence[str]] | None = None,
    partial: bool = False,
  ) -> Restored:
    """Restores the latest good committed step (or exactly `step`); see the module docstring.

    Args:
      target: the restore target: a pytree like the saved state whose array leaves are
        `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` (see `abstract_target`); arrays are
        placed straight onto those shardings, so another mesh or device count is fine. Or a
        function of the step's saved config returning it (called before any array is read).
        None restores with the saved layout (same topology only).
      step: restore this step only (no fallback); default: newest committed step.
      verify: check the manifest before and the per-leaf checksums after reading; rejected
        steps are moved aside (unless read-only). False: no checks (benchmarks).
      fallback: if the newest step is rejected, try older steps (newest first).
      check_config: called with the saved config before any array is read; raises
        `ConfigChangedError` to refuse, returns warnings (`ckpt_config.ConfigCheck`).
      partial: `target` names a sub-tree of the saved state (e.g. {'train': {'params': ...}});
        only those arrays are read and fingerprint-checked (the manifest check covers every
        file of the step either way), and `data_iter` comes back empty.

    Raises:
      CheckpointError: no committed step, every candidate was rejected, or an intact step could
        not be read into the target.
      ConfigChangedError: the config check refused, or the saved leaf shapes differ.
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
      result, why = self._restore_one(s, target, verify, partial, check_config)
      if result is not None:
        if skipped:
          logging.warning(
            "restored step %d after rejecting newer steps:\n  %s", s, "\n  ".join(skipped)
          )
        return dataclasses.replace(result, skipped=tuple(skipped))
      skipped.append(self._reject(s, why) if verify else why)
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


def _first(problems: Sequence[str], sep: str = "; ", n: int = 10) -> str:
  """The first `n` problems joined, and how many more there are."""
  more = f" (+{len(problems) - n} more)" if len(problems) > n else ""
  return sep.join(problems[:n]) + more
