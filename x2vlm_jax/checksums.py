"""Per-leaf checksums of a pytree of arrays: shape, dtype and a 64-bit fingerprint of the bits.

The fingerprint is a position-weighted sum of the leaf's 32-bit words modulo 2**32 (two lanes).
Integer addition modulo 2**32 is exact and order independent, so the value is the same however
the array is sharded: it is computed inside one `jax.jit` on the global arrays (each device
reduces its own shard, XLA adds the partial sums), works unchanged with several processes, and
verifies a state that was restored onto a different mesh. Per position the word -> term map is a
bijection, so any single changed element is always detected.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from x2vlm_jax import treepath

_K1, _K2, _K3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D


def leaf_name(path) -> str:
  """A readable leaf path: 'opt_state/0/mu/w' instead of "[0].mu['w']"."""
  return treepath.path_str(path, "/", root="<root>")


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
    raise TypeError(
      f"{where}: typed PRNG key arrays are not saved directly; store "
      "jax.random.key_data(key) (uint32) and wrap it again after restore"
    )
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
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(
      jnp.uint32
    )
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


def leaf_names(tree) -> list[str]:
  """The checksum names of a pytree's leaves ('train/params/text/...')."""
  return [leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def leaf_checksums(tree) -> dict[str, dict]:
  """Per-leaf {shape, dtype, fingerprint} of a pytree of jax/numpy arrays and scalars."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out, dev_paths, dev_leaves = {}, [], []
  for path, leaf in flat:
    name = leaf_name(path)
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
      out[name] = {
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "fingerprint": f"{h1:08x}{h2:08x}",
      }
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


def verify_checksums(
  tree, expected: Mapping[str, Mapping], cast: Mapping[str, str] | None = None
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
    if (
      name in expected
      and name in got
      and name in cast
      and cast[name] == got[name]["dtype"]
      and expected[name]["dtype"] != cast[name]
    ):
      logging.info(
        "leaf %r restored as %s (saved %s): checksum not comparable, skipped",
        name,
        cast[name],
        expected[name]["dtype"],
      )
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
