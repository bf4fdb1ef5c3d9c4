"""The train state: its layout, its shardings, how it is born, restored and read as a model.

The state is a plain dict pytree, so it checkpoints as is:

  {'params':          nested dict of arrays (the model's parameters, `nnx.to_pure_dict` layout;
                     X2VLM or MVPTR, whichever family the model config is: `models/family.py`),
   'opt_state':       the optax state of `optim.make_optimizer`,
   'step':            int32, updates applied so far,
   'nonfinite_run':   int32, consecutive skipped (non-finite) updates,
   'nonfinite_total': int32, skipped updates in total}

`ParamLayout` is what the parameters need on a mesh (the model's graph, its abstract
parameters, their shardings); `TrainStateSpec` adds the optimizer and the shardings of every
leaf of the state. Parameters are
sharded by their logical axis names (`sharding.py`); every optimizer-state sub-tree that has
the parameters' structure (the Adam moments) is sharded like the parameters, found through the
optimizer's own structure (`optax.tree_map_params`); counters and scalars are replicated.

A checkpoint holds {'train': the state, 'rng': key data of the run's base key}.
`restore_params` reads only the parameters of such a checkpoint (evaluation and export never
materialise the optimizer state, about twice the parameters' memory).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from x2vlm_jax import checkpoint as ckpt_lib
from x2vlm_jax import optim, sharding
from x2vlm_jax.models import family
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.models.mvptr_config import MvptrConfig

AnyModelConfig = ModelConfig | MvptrConfig  # the family is the config's class (`family.name`)

COUNTERS = ("step", "nonfinite_run", "nonfinite_total")
TRAIN, RNG = "train", "rng"  # the two entries of a checkpointed state


def init_state(params: dict, tx: optax.GradientTransformation) -> dict:
  """The train state of `params` (a pure nested dict): optimizer state and zeroed counters."""
  state = {"params": params, "opt_state": tx.init(params)}
  state.update({name: jnp.zeros((), jnp.int32) for name in COUNTERS})
  return state


def model_from_params(graphdef, abstract_params: nnx.State, params: dict) -> nnx.Module:
  """The model whose parameters are `params` (a pure nested dict; inside or outside jit)."""
  st = jax.tree.map(lambda x: x, abstract_params)  # a fresh State to fill, same metadata
  nnx.replace_by_pure_dict(st, params)
  return nnx.merge(graphdef, st)


def _opt_state_shardings(
  tx: optax.GradientTransformation, abstract_params: dict, param_sh: dict, mesh: Mesh
):
  """Shardings of `tx.init(params)`: parameter-shaped sub-trees like the parameters."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
    tx, lambda _, sh: sh, abstract_opt, param_sh, transform_non_params=lambda _: replicated
  )


@dataclasses.dataclass(frozen=True, eq=False)
class ParamLayout:
  """The model's parameters on one mesh: graph, abstract parameters and their shardings."""

  model_cfg: AnyModelConfig
  mesh: Mesh
  graphdef: Any  # nnx.GraphDef of the model (parameters split off)
  abstract_params: nnx.State  # ShapeDtypeStruct leaves, with the logical-axis metadata
  shardings: dict  # a NamedSharding per parameter (pure nested dict)

  @classmethod
  def build(cls, model_cfg: AnyModelConfig, mesh: Mesh) -> ParamLayout:
    graphdef, abstract_params = nnx.split(family.abstract(model_cfg), nnx.Param)
    shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))
    return cls(model_cfg, mesh, graphdef, abstract_params, shardings)

  def abstract(self) -> dict:
    """The parameters as a pure dict of ShapeDtypeStructs carrying their shardings."""
    return ckpt_lib.abstract_target(nnx.to_pure_dict(self.abstract_params), self.shardings)

  def model(self, params: dict) -> nnx.Module:
    """The model holding `params` (a pure dict, e.g. `state['params']`)."""
    return model_from_params(self.graphdef, self.abstract_params, params)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainStateSpec:
  """The layout of one run's train state on one mesh (see the module docstring).

  Attributes:
    params: the parameters' layout (graph, abstract parameters, shardings).
    tx: the optimizer (`optim.make_optimizer`).
    fresh_paths: parameter path prefixes trained at lr x lr_mult (their optimizer group).
    shardings: a NamedSharding per leaf of the state dict.
  """

  params: ParamLayout
  tx: optax.GradientTransformation
  fresh_paths: tuple[str, ...]
  shardings: dict

  @classmethod
  def build(
    cls, model_cfg: AnyModelConfig, optim_cfg: optim.OptimConfig, mesh: Mesh, fresh_paths=()
  ) -> TrainStateSpec:
    layout = ParamLayout.build(model_cfg, mesh)
    tx = optim.make_optimizer(optim_cfg, tuple(fresh_paths))
    pure = nnx.to_pure_dict(layout.abstract_params)
    optim.check_fresh_paths(pure, fresh_paths)
    shardings = {
      "params": layout.shardings,
      "opt_state": _opt_state_shardings(tx, pure, layout.shardings, mesh),
    }
    shardings.update({name: NamedSharding(mesh, P()) for name in COUNTERS})
    return cls(layout, tx, tuple(fresh_paths), shardings)

  @property
  def model_cfg(self) -> AnyModelConfig:
    return self.params.model_cfg

  @property
  def mesh(self) -> Mesh:
    return self.params.mesh

  @property
  def abstract_params(self) -> nnx.State:
    return self.params.abstract_params

  @property
  def param_shardings(self) -> dict:
    return self.params.shardings

  def model(self, params: dict) -> nnx.Module:
    """The model holding `params` (e.g. `state['params']`)."""
    return self.params.model(params)

  def abstract_state(self) -> dict:
    """The state as ShapeDtypeStructs carrying their shardings."""
    shapes = jax.eval_shape(
      lambda p: init_state(p, self.tx), nnx.to_pure_dict(self.abstract_params)
    )
    return ckpt_lib.abstract_target(shapes, self.shardings)

  def create(self, params: dict) -> dict:
    """The train state of loaded `params` (a pure dict), every leaf in its sharding."""
    return jax.jit(lambda p: init_state(p, self.tx), out_shardings=self.shardings)(params)

  def init(self, key: int | jax.Array = 0, compiler_options: dict | None = None) -> dict:
    """A state with freshly initialised parameters: the model constructor and `tx.init` in
    ONE jit whose outputs are born in their shardings, so nothing is whole on one device.

    key: an int seed or a PRNG key (an 'rbg' key compiles the init much faster on CPU).
    """
    key = jax.random.key(key) if isinstance(key, int) else key
    cfg = self.model_cfg

    def fn(k):
      params = nnx.state(family.construct(cfg, nnx.Rngs(params=k)), nnx.Param)
      return init_state(nnx.to_pure_dict(params), self.tx)

    return jax.jit(fn, out_shardings=self.shardings, compiler_options=compiler_options)(key)

  def checkpoint_item(self, state: dict, rng_data: jax.Array) -> dict:
    """What a checkpoint stores: the state and the base key's data (replicated uint32)."""
    return {TRAIN: state, RNG: rng_data}

  def checkpoint_target(self) -> dict:
    """The restore target of `checkpoint_item`: abstract leaves with their shardings."""
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(self.mesh, P()))
    return {TRAIN: self.abstract_state(), RNG: rng}


def restore_params(
  manager: ckpt_lib.CheckpointManager, layout: ParamLayout, step: int | None = None
) -> tuple[dict, int]:
  """(params, step) of the newest good checkpoint (or exactly `step`), parameters only.

  Only the parameter arrays are read (straight into their shardings on `layout.mesh`) and
  verified against their saved checksums; the optimizer state is never loaded.
  """
  restored = manager.restore({TRAIN: {"params": layout.abstract()}}, step=step, partial=True)
  return restored.state[TRAIN]["params"], int(restored.step)
