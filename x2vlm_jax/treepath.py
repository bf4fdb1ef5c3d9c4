"""Readable names for JAX key paths, shared by the optimizer's parameter groups and checkpoints."""

from __future__ import annotations

import jax


def path_parts(keypath) -> list[str]:
  """A JAX key path -> its components as strings ('vision', 'blocks', 'attn', ...).

  The trailing `.value` attribute of an `nnx.Variable` is dropped, so nnx.State trees (with
  Variables) and pure array trees give the same names.
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
