"""Parameter paths: the one place where a position in a tree becomes a string, and back.

Two spellings are in use, and both are stored in files, so neither may change:

* dotted, 'text.layers.attn.query.kernel': the optimizer's parameter groups and `fresh_paths`
  (saved in checkpoints' config), the converters' rule targets, params directories;
* slashed, 'opt_state/0/mu/text/...': the leaf names of checkpoint checksums (`sep="/"`).

Two kinds of tree are flattened:

* any JAX pytree (nested dicts, `nnx.State`, optax states, orbax metadata): `flatten`, in JAX's
  leaf order, a leaf being whatever JAX calls a leaf;
* plain nested dicts whose leaves may be anything that is not a Mapping, tuples included (the
  converters' `(shape, dtype)` pairs), with keys of mixed types (the int list indices of
  `nnx.to_pure_dict`): `flatten_dict` / `unflatten_dict`, in insertion order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax


def path_parts(keypath) -> list[str]:
  """A JAX key path -> its components as strings ('vision', 'blocks', 'attn', ...).

  The trailing `.value` attribute of an `nnx.Variable` is dropped, so nnx.State trees (with
  Variables) and pure array trees give the same names. Plain keys (the str / int tuples of
  `nnx.to_flat_state`, or parts from this function) are taken as they are.
  """
  parts = []
  for i, k in enumerate(keypath):
    if isinstance(k, jax.tree_util.GetAttrKey):
      if k.name == "value" and i == len(keypath) - 1:
        continue
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return parts


def path_str(keypath, sep: str = ".", root: str = "") -> str:
  """A key path (JAX keys or plain str / int keys) -> 'vision.blocks.attn.qkv.kernel'.

  sep: '.' for parameter paths, '/' for checkpoint leaf names. root: the name of the empty path
  (a tree that is a single leaf).
  """
  return sep.join(path_parts(keypath)) or root


def flatten(tree) -> list[tuple[str, Any]]:
  """(dotted path, leaf) of every leaf of a pytree (dict, nnx.State, abstract or concrete)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(kp), leaf) for kp, leaf in leaves]


def unflatten_like(tree, flat: Mapping[str, Any]):
  """A tree shaped like `tree` whose leaves come from `flat` (dotted paths, as `flatten`)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return jax.tree_util.tree_unflatten(treedef, [flat[path_str(kp)] for kp, _ in leaves])


def flatten_state(state) -> dict[str, Any]:
  """An `nnx.State` -> {dotted path: Variable}, in `nnx.to_flat_state` order."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return {path_str(p): v for p, v in nnx.to_flat_state(state)}


def flatten_dict(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dict -> {dotted path: leaf}. Integer keys (NNX list indices) become path parts too."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten_dict(v, path + "."))
    else:
      out[path] = v
  return out


def unflatten_dict(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{dotted path: leaf} -> nested dict of str keys (inverse of `flatten_dict`)."""
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    *parents, last = path.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = v
  return out


def set_path(tree: dict, path: str, value: Any) -> None:
  """Writes `value` at a dotted path of an existing nested dict, in place.

  A part made of digits is the int key when the dict has one (the list indices of
  `nnx.to_pure_dict`), else the string. Missing parents raise KeyError.
  """
  *parents, last = path.split(".")
  node = tree
  for part in parents:
    node = node[_key(node, part)]
  node[_key(node, last)] = value


def _key(node: Mapping, part: str):
  return int(part) if part.isdigit() and int(part) in node else part
