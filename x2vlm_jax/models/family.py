"""The model families the one training engine runs: X²-VLM (`ModelConfig` -> `X2VLM`) and MVPTR
(`MvptrConfig` -> `MVPTR`, docs/mvptr.md). The train state, initialisation and export ask here
which module a config builds, so nothing above the models branches on the class itself.

  name(cfg)                       'x2vlm' | 'mvptr'
  construct(cfg, rngs)            the module with initialised parameters
  abstract(cfg)                   the module with ShapeDtypeStruct leaves (nothing allocated)
  create_sharded(cfg, mesh, key)  the module with every parameter born in its mesh sharding
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from x2vlm_jax import sharding
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.models.mvptr import MVPTR
from x2vlm_jax.models.mvptr_config import MvptrConfig
from x2vlm_jax.models.x2vlm import X2VLM

FAMILIES = {"x2vlm": (ModelConfig, X2VLM), "mvptr": (MvptrConfig, MVPTR)}


def name(cfg) -> str:
  """The family of a model config ('x2vlm' or 'mvptr')."""
  for family, (cfg_cls, _) in FAMILIES.items():
    if isinstance(cfg, cfg_cls):
      return family
  raise TypeError(f"{type(cfg).__name__} is not the config of a model family {list(FAMILIES)}")


def construct(cfg, rngs: nnx.Rngs) -> nnx.Module:
  """The family's module for `cfg`, parameters drawn from `rngs`."""
  return FAMILIES[name(cfg)][1](cfg, rngs=rngs)


def abstract(cfg) -> nnx.Module:
  """The module with ShapeDtypeStruct leaves (nnx.eval_shape): nothing is allocated."""
  return nnx.eval_shape(lambda: construct(cfg, nnx.Rngs(0)))


def create_sharded(cfg, mesh: Mesh, key: int | jax.Array = 0) -> nnx.Module:
  """The module with every parameter born in its final sharding on `mesh`: the constructor
  runs in one `jax.jit` whose out_shardings come from the logical names, so no device ever holds
  a whole unsharded copy. key: an int seed or a PRNG key (its implementation decides the
  generator)."""
  graphdef, abstract_state = nnx.split(abstract(cfg))
  shardings = sharding.state_shardings(abstract_state, mesh)
  key = jax.random.key(key) if isinstance(key, int) else key
  state = jax.jit(lambda k: nnx.state(construct(cfg, nnx.Rngs(params=k))), out_shardings=shardings)(
    key
  )
  return nnx.merge(graphdef, state)
