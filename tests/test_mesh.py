"""The device mesh comes from `jax.make_mesh` (topology-aware device order on real pods) with
Auto axes: shardings stay annotation-driven, as every jitted program of the project assumes."""

import jax
import pytest
from jax.sharding import AxisType

from x2vlm_jax import sharding


def test_mesh_from_make_mesh_with_auto_axes():
  mesh = sharding.make_mesh({"data": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  ref = jax.make_mesh((4, 1, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in ref.devices.flat]
  one = sharding.make_mesh({"data": 1}, devices=jax.devices()[3:4])
  assert [d.id for d in one.devices.flat] == [jax.devices()[3].id]
  # A sharded computation under the mesh runs with the annotation-driven (Auto) semantics.
  x = jax.device_put(jax.numpy.arange(8.0), jax.NamedSharding(mesh, jax.P("data")))
  assert float(jax.jit(lambda a: (a * 2).sum())(x)) == 56.0


@pytest.mark.parametrize(
  "shape, message",
  [
    ({"data": 3}, "needs 3 devices"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"x": 2}, "unknown"),
  ],
)
def test_bad_shapes_are_named(shape, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(shape)
