"""treepath: the one spelling of parameter paths (dotted) and checkpoint leaf names (slashed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from x2vlm_jax import treepath


class _Tiny(nnx.Module):
  def __init__(self):
    self.layers = nnx.List([nnx.Linear(2, 3, rngs=nnx.Rngs(0)) for _ in range(2)])
    self.norm = nnx.LayerNorm(3, rngs=nnx.Rngs(0))


def test_path_str_dotted_slashed_and_root():
  tree = {"a": {"b": [jnp.zeros(1), jnp.ones(1)]}}
  (kp0, _), (kp1, _) = jax.tree_util.tree_flatten_with_path(tree)[0]
  assert treepath.path_str(kp0) == "a.b.0"
  assert treepath.path_str(kp1, sep="/") == "a/b/1"
  ((kp, _),) = jax.tree_util.tree_flatten_with_path(jnp.zeros(3))[0]
  assert treepath.path_str(kp) == ""
  assert treepath.path_str(kp, sep="/", root="<root>") == "<root>"
  # Plain keys (nnx.to_flat_state tuples, path_parts output) read the same.
  assert treepath.path_str(("text", "layers", 0, "kernel")) == "text.layers.0.kernel"
  assert treepath.path_str(["x", "y"], sep="/") == "x/y"


def test_state_and_pure_dict_give_the_same_names():
  state = nnx.state(_Tiny(), nnx.Param)
  pure = nnx.to_pure_dict(state)
  names = [p for p, _ in treepath.flatten(state)]
  assert names == [p for p, _ in treepath.flatten(pure)]
  assert "layers.1.kernel" in names and "norm.scale" in names
  assert list(treepath.flatten_state(state)) == [
    ".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)
  ]
  assert set(treepath.flatten_state(state)) == set(names)


def test_unflatten_like_rebuilds_the_tree():
  tree = {"a": {"b": np.zeros(2)}, "c": (np.ones(1), np.ones(2))}
  flat = {p: f"leaf {p}" for p, _ in treepath.flatten(tree)}
  assert treepath.unflatten_like(tree, flat) == {
    "a": {"b": "leaf a.b"},
    "c": ("leaf c.0", "leaf c.1"),
  }


def test_flatten_dict_keeps_tuple_leaves_order_and_int_keys():
  nested = {"z": {"kernel": ((2, 3), np.float32)}, "a": {0: {"w": 1}, 1: {"w": 2}}}
  flat = treepath.flatten_dict(nested)
  assert list(flat) == ["z.kernel", "a.0.w", "a.1.w"]
  assert flat["z.kernel"] == ((2, 3), np.float32)
  assert treepath.unflatten_dict(flat) == {
    "z": {"kernel": ((2, 3), np.float32)},
    "a": {"0": {"w": 1}, "1": {"w": 2}},
  }


def test_set_path_uses_int_list_keys():
  pure = nnx.to_pure_dict(nnx.state(_Tiny(), nnx.Param))
  treepath.set_path(pure, "layers.1.bias", "x")
  treepath.set_path(pure, "norm.scale", "y")
  assert pure["layers"][1]["bias"] == "x" and pure["norm"]["scale"] == "y"
  with pytest.raises(KeyError):
    treepath.set_path(pure, "nope.bias", 0)
