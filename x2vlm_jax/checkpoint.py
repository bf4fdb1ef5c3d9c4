"""Checkpointing: an orbax `CheckpointManager` wrapper with integrity checks.

Each saved step holds four items, written together and committed atomically by orbax:

  state      the train-state pytree (params, optimizer state, step, PRNG key data, ...)
  data_iter  the data-iterator state, a JSON dict with one entry per data kind
  config     the run config as JSON (to refuse a resume whose critical settings changed)
  checksums  per-leaf shape, dtype and a 64-bit fingerprint of the leaf's bits

The fingerprint is a position-weighted sum of the leaf's 32-bit words modulo 2**32 (two lanes).
Integer addition modulo 2**32 is exact and order independent, so the value is the same however
the array is sharded: it is computed inside one `jax.jit` on the global arrays (each device
reduces its own shard, XLA adds the partial sums), works unchanged with several processes, and
verifies a state that was restored onto a different mesh. Per position the word -> term map is a
bijection, so any single changed element is always detected.

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
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as ocp_policies

from x2vlm_jax import treepath

STATE, DATA_ITER, CONFIG, CHECKSUMS = "state", "data_iter", "config", "checksums"
_ITEMS = (STATE, DATA_ITER, CONFIG, CHECKSUMS)
_CHECKSUM_FORMAT = 1

# Settings whose change makes a resumed run a different experiment (task brief of issue #5). The
# trainer may pass its own list; a key also covers every nested key below it ('model' covers
# 'model.vision.depth').
DEFAULT_CRITICAL_KEYS = ("model", "seed", "batch_size", "batch_sizes", "data.sources")


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
# Per-leaf fingerprints.

_K1, _K2, _K3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D


def _mix(a, xp):
  """xorshift: an invertible scramble of uint32 words (keeps single-word changes visible)."""
  return a ^ (a >> xp.uint32(15))


def _lanes(words, idx, xp):
  """Two position-weighted uint32 sums of `words` (uint32) at flat positions `idx` (uint32)."""
  odd = idx * xp.uint32(_K1) | xp.uint32(1)  # odd => w -> w * odd is a bijection mod 2**32
  h1 = xp.sum(_mix(words * odd, xp), dtype=xp.uint32)
  h2 = xp.sum(_mix((words ^ (idx * xp.uint32(_K2))) * xp.uint32(_K3), xp), dtype=xp.uint32)
  return h1, h2


def _check_dtype(dtype, where: str):
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    raise TypeError(f"{where}: typed PRNG key arrays are not saved directly; store "
                    "jax.random.key_data(key) (uint32) and wrap it again after restore")
  if np.dtype(dtype).kind == "c" or np.dtype(dtype).itemsize not in (1, 2, 4, 8):
    raise TypeError(f"{where}: unsupported dtype {dtype} for checkpoint checksums")


def _device_words(x):
  """uint32 words of a jax array, C order; 8-byte dtypes get a trailing axis of 2."""
  size = np.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes -> [..., 2]


def _device_fingerprint(x):
  """[2] uint32 fingerprint of one (possibly sharded) jax array, inside jit."""
  w = _device_words(x)
  # Flat C-order position from per-axis iotas: no reshape, so a sharded leaf is never gathered.
  idx = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in range(w.ndim - 1, -1, -1):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= w.shape[axis]
  return jnp.stack(_lanes(w, idx, jnp))


_device_fingerprints = jax.jit(lambda xs: [_device_fingerprint(x) for x in xs])


def _host_fingerprint(x: np.ndarray) -> tuple[int, int]:
  """The same fingerprint as `_device_fingerprint`, computed with numpy (any numpy dtype)."""
  x = np.ascontiguousarray(x)
  size = x.dtype.itemsize
  if x.dtype == np.bool_:
    w = x.astype(np.uint32)
  elif size in (1, 2):
    w = x.view(np.uint8 if size == 1 else np.uint16).astype(np.uint32)
  else:
    w = x.reshape(-1).view(np.uint32)  # 8-byte words: pairs of uint32 in C order (little endian)
  w = w.reshape(-1)
  idx = np.arange(w.size, dtype=np.uint32)
  with np.errstate(over="ignore"):
    h1, h2 = _lanes(w, idx, np)
  return int(h1), int(h2)


def leaf_checksums(tree) -> dict[str, dict]:
  """Per-leaf {shape, dtype, fingerprint} of a pytree of jax/numpy arrays and scalars."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out, dev_paths, dev_leaves = {}, [], []
  for path, leaf in flat:
    name = treepath.path_str(path, "/", root="<root>")
    if isinstance(leaf, jax.Array):
      _check_dtype(leaf.dtype, f"state leaf {name!r}")
      dev_paths.append(name)
      dev_leaves.append(leaf)
      out[name] = {"shape": list(leaf.shape), "dtype": str(leaf.dtype)}
    else:
      arr = np.asarray(leaf)
      if arr.dtype == object:
        raise TypeError(f"state leaf {name!r} of type {type(leaf).__name__} is not an array")
      _check_dtype(arr.dtype, f"state leaf {name!r}")
      h1, h2 = _host_fingerprint(arr)
      out[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "fingerprint": f"{h1:08x}{h2:08x}"}
  # One jit per set of devices (a state may mix mesh-sharded leaves and single-device scalars).
  groups: dict[tuple, list[int]] = {}
  for i, leaf in enumerate(dev_leaves):
    groups.setdefault(tuple(sorted(d.id for d in leaf.sharding.device_set)), []).append(i)
  for members in groups.values():
    fps = _device_fingerprints([dev_leaves[i] for i in members])
    for i, fp in zip(members, fps):
      # The result is replicated; one local copy is enough (also with several processes).
      h1, h2 = (int(v) for v in np.asarray(fp.addressable_data(0)))
      out[dev_paths[i]]["fingerprint"] = f"{h1:08x}{h2:08x}"
  return out


def verify_checksums(tree, expected: Mapping[str, Mapping], cast: Mapping[str, str] | None = None
                     ) -> list[str]:
  """Compares a restored tree with saved checksums; returns one problem line per bad leaf.

  Args:
    tree: the restored pytree.
    expected: the saved per-leaf checksums (`leaf_checksums` of the saved state).
    cast: leaf name -> dtype the restore target asked for. A leaf deliberately restored in
      another dtype (e.g. float32 params read as bfloat16) cannot be compared bit for bit; it is
      skipped (logged) rather than reported as corrupt.
  """
  got = leaf_checksums(tree)
  cast = cast or {}
  problems = []
  for name in sorted(set(expected) | set(got)):
    if (name in expected and name in got and name in cast and cast[name] == got[name]["dtype"]
        and expected[name]["dtype"] != cast[name]):
      logging.info("leaf %r restored as %s (saved %s): checksum not comparable, skipped",
                   name, cast[name], expected[name]["dtype"])
    elif name not in got:
      problems.append(f"leaf {name!r} is in the saved checksums but not in the restored state")
    elif name not in expected:
      problems.append(f"leaf {name!r} has no saved checksum")
    else:
      e, g = expected[name], got[name]
      for field in ("shape", "dtype", "fingerprint"):
        saved, restored = e.get(field), g[field]
        if field == "shape":
          saved, restored = list(saved or ()), list(restored)
        if saved != restored:
          problems.append(f"leaf {name!r}: {field} {restored} != saved {saved}")
          break
  return problems


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


def check_config_compatible(saved_cfg, new_cfg, critical_keys: Sequence[str] = DEFAULT_CRITICAL_KEYS,
                            allow_config_change: bool = False) -> list[str]:
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
    msg = ("critical config settings differ from the checkpoint:\n  " + "\n  ".join(diffs))
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
  return {treepath.path_str(p, "/", root="<root>"): str(np.dtype(x.dtype)) for p, x in flat if hasattr(x, "dtype")}


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
  """

  def __init__(self, directory, *, max_to_keep: int | None = 3, keep_every: int | None = None,
               async_save: bool = True, save_interval_steps: int = 1):
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

  def save(self, step: int, state, *, data_iter: Mapping[str, Any] | None = None,
           config=None, force: bool = False) -> bool:
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
        args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA_ITER: ocp.args.JsonSave(data_iter),
            CONFIG: ocp.args.JsonSave(to_jsonable(config if config is not None else {})),
            CHECKSUMS: ocp.args.JsonSave(checksums),
        }),
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

  def _restore_one(self, step: int, target, verify: bool) -> tuple[Restored | None, str | None]:
    """Restores and verifies one step; returns (result, None) or (None, why it was rejected)."""
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(target),
          DATA_ITER: ocp.args.JsonRestore(),
          CONFIG: ocp.args.JsonRestore(),
          CHECKSUMS: ocp.args.JsonRestore(),
      }))
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
      return None, f"step {step} is unreadable: {type(e).__name__}: {str(e)[:500]}"
    if verify:
      sums = out[CHECKSUMS] or {}
      if sums.get("format") != _CHECKSUM_FORMAT or "leaves" not in sums:
        return None, f"step {step} has no usable checksums (format {sums.get('format')!r})"
      problems = verify_checksums(out[STATE], sums["leaves"], _target_dtypes(target))
      if problems:
        return None, f"step {step} is corrupt: " + "; ".join(problems[:10]) + (
            f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
    return Restored(step=step, state=out[STATE], data_iter=dict(out[DATA_ITER] or {}),
                    config=dict(out[CONFIG] or {})), None

  def restore(self, target=None, *, step: int | None = None, verify: bool = True,
              fallback: bool = True, config=None, critical_keys: Sequence[str] = DEFAULT_CRITICAL_KEYS,
              allow_config_change: bool = False) -> Restored:
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

    Raises:
      CheckpointError: no committed step, or every candidate step was rejected.
      ConfigChangedError: the restored step's config differs in a critical key.
    """
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"step {step} is not a committed checkpoint in {self.directory} "
                              f"(committed: {steps})")
      candidates = [step]
    else:
      candidates = sorted(steps, reverse=True)
      if not fallback:
        candidates = candidates[:1]
    if not candidates:
      raise CheckpointError(f"no committed checkpoint in {self.directory}")
    skipped = []
    for s in candidates:
      result, why = self._restore_one(s, target, verify)
      if result is not None:
        if skipped:
          logging.warning("restored step %d after rejecting newer steps:\n  %s", s, "\n  ".join(skipped))
        result = dataclasses.replace(result, skipped=tuple(skipped))
        if config is not None:
          check_config_compatible(result.config, config, critical_keys, allow_config_change)
        return result
      logging.error("checkpoint rejected: %s", why)
      skipped.append(why)
    raise CheckpointError(f"no restorable checkpoint in {self.directory}:\n  " + "\n  ".join(skipped))

  def close(self):
    """Waits for pending saves and releases orbax resources."""
    self._mgr.wait_until_finished()
    self._mgr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
