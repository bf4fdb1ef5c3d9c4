"""The train step jitted for a mesh, and a train state born sharded on it.

* `train_state_shardings`: parameters by their logical names (`sharding.state_shardings`), every
  optimizer-state leaf that mirrors a parameter (Adam moments) like that parameter, counters
  and scalars replicated.
* `create_train_state`: the model constructor and `tx.init` in ONE jit whose out_shardings
  are those state shardings (as `x2vlm.create_sharded` does for the parameters alone), so
  nothing is ever whole on one device.
* `jit_train_step`: `jax.jit` of `train_step.make_train_step(...)` with those state shardings
  in and out, the state donated, the batch split over ('data', 'fsdp') (axis 1 under gradient
  accumulation, whose axis 0 is the micro-batch), `itm` static, and the mesh set as the ambient
  mesh while tracing so the model's activation constraints (`layers.constrain`) are active.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from x2vlm_jax import sharding, treepath
from x2vlm_jax import train_step as ts
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.models.x2vlm import X2VLM, abstract_model

COUNTERS = ("step", "nonfinite_run", "nonfinite_total")


def param_shardings(abstract_params: nnx.State, mesh: Mesh) -> dict:
  """Pure nested dict of NamedShardings for an nnx.State of parameters (abstract or not)."""
  return nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: dict,
                        param_sh: dict, mesh: Mesh):
  """Shardings of `tx.init(params)`: a leaf whose path ends with a parameter's path and has its
  shape (Adam mu / nu) gets that parameter's sharding; everything else is replicated."""
  replicated = NamedSharding(mesh, P())
  by_path = {path: (sh, tuple(leaf.shape)) for (path, sh), (_, leaf) in
             zip(treepath.flatten(param_sh), treepath.flatten(abstract_params))}
  abstract_opt = jax.eval_shape(tx.init, abstract_params)

  def one(keypath, leaf):
    parts = treepath.path_parts(keypath)
    for i in range(len(parts)):  # longest suffix first
      hit = by_path.get(treepath.path_str(parts[i:]))
      if hit is not None and hit[1] == tuple(leaf.shape):
        return hit[0]
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_opt)


def train_state_shardings(abstract_params: nnx.State, tx: optax.GradientTransformation,
                          mesh: Mesh) -> dict:
  """Shardings of the whole train state dict (`train_step.init_state` layout)."""
  param_sh = param_shardings(abstract_params, mesh)
  pure = nnx.to_pure_dict(abstract_params)
  out = {"params": param_sh, "opt_state": opt_state_shardings(tx, pure, param_sh, mesh)}
  out.update({name: NamedSharding(mesh, P()) for name in COUNTERS})
  return out


@dataclasses.dataclass
class TrainState:
  """A sharded train state with what is needed to build its step."""

  graphdef: Any  # nnx.GraphDef of the model's parameters
  abstract_params: nnx.State  # ShapeDtypeStruct leaves, with the logical-name metadata
  shardings: dict  # train_state_shardings(...)
  state: dict  # {'params', 'opt_state', 'step', 'nonfinite_run', 'nonfinite_total'}


def create_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                       key: int | jax.Array = 0, compiler_options: dict | None = None
                       ) -> TrainState:
  """A fresh model and optimizer state, every array created in its final sharding.

  key: an int seed or a PRNG key (an 'rbg' key compiles the init much faster on CPU).
  """
  graphdef, abstract_params = nnx.split(abstract_model(model_cfg), nnx.Param)
  shardings = train_state_shardings(abstract_params, tx, mesh)
  key = jax.random.key(key) if isinstance(key, int) else key

  def init(k):
    params = nnx.state(X2VLM(model_cfg, rngs=nnx.Rngs(params=k)), nnx.Param)
    return ts.init_state(nnx.to_pure_dict(params), tx)

  state = jax.jit(init, out_shardings=shardings, compiler_options=compiler_options)(key)
  return TrainState(graphdef, abstract_params, shardings, state)


def batch_shardings(batch: Mapping, mesh: Mesh, accum_steps: int = 1):
  """NamedShardings of a (device) MixedBatch: the batch axis over ('data', 'fsdp')."""
  if accum_steps > 1:  # [A, B, ...]: micro-batch axis first, batch axis second
    return jax.tree.map(
        lambda x: NamedSharding(mesh, P(None, sharding.LOGICAL_RULES["batch"],
                                        *([None] * (x.ndim - 2)))), batch)
  return jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batch)


class ShardedStep:
  """`step(state, batch, key, itm=True) -> (state, metrics)`, jitted for one mesh.

  The input state is donated (its buffers are reused for the new state). `lower` gives the
  `jax.stages.Lowered` (for cost analysis / ahead-of-time compilation) under the same mesh.
  """

  def __init__(self, step, mesh: Mesh, state_sh: dict, batch_sh, donate: bool = True,
               compiler_options: dict | None = None):
    self.mesh = mesh
    replicated = NamedSharding(mesh, P())
    self.jitted = jax.jit(step, in_shardings=(state_sh, batch_sh, replicated),
                          out_shardings=(state_sh, replicated), static_argnums=(3,),
                          donate_argnums=(0,) if donate else (),
                          compiler_options=compiler_options)

  def __call__(self, state, batch, key, itm: bool = True):
    with jax.set_mesh(self.mesh):  # activation sharding constraints see the mesh
      return self.jitted(state, batch, key, itm)

  def lower(self, state, batch, key, itm: bool = True):
    """Lowers (traces) the step for these arguments (arrays or ShapeDtypeStructs)."""
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(state, batch, key, itm)


def jit_train_step(ts_state: TrainState, tx: optax.GradientTransformation,
                   cfg: ts.StepConfig, mesh: Mesh, model_cfg: ModelConfig, batch: Mapping,
                   accum_steps: int = 1, grad_hook=None, donate: bool = True,
                   compiler_options: dict | None = None) -> ShardedStep:
  """The sharded, jitted train step for `ts_state` and batches shaped like `batch`.

  `batch` may hold arrays or ShapeDtypeStructs (only the tree structure and ranks are used);
  with accum_steps > 1 every leaf carries the leading micro-batch axis. `compiler_options`
  go to XLA (e.g. the fast-compiling CPU options of the tests).
  """
  step = ts.make_train_step(ts_state.graphdef, ts_state.abstract_params, tx, cfg, mesh,
                            model_cfg, accum_steps=accum_steps, grad_hook=grad_hook)
  return ShardedStep(step, mesh, ts_state.shardings,
                     batch_shardings(batch, mesh, accum_steps), donate, compiler_options)


def put_batch(batch: Mapping, mesh: Mesh, accum_steps: int = 1):
  """Places a host MixedBatch (numpy, single process) on the mesh with the step's shardings."""
  batch = ts.device_batch(batch)
  return jax.device_put(batch, batch_shardings(batch, mesh, accum_steps))
