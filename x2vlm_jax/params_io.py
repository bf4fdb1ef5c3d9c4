"""Our on-disk format for converted weights: a directory the trainer can start from.

    <dir>/model_config.json   ModelConfig as JSON (dtypes by name, e.g. "float32")
    <dir>/params/             the nested param dict, saved with orbax's StandardCheckpointer

`load_params` restores into an abstract target; with shardings, every array is read directly
into its shards on the mesh (orbax/tensorstore read per shard), so a large model is never
materialised whole on one device or host.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from x2vlm_jax import paths
from x2vlm_jax.models.config import FusionConfig, ModelConfig, TextConfig, VisionConfig

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
_DTYPE_FIELDS = ("dtype", "param_dtype")
_TOWERS = {"vision": VisionConfig, "text": TextConfig, "fusion": FusionConfig}


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
  """ModelConfig -> JSON-able dict; dtypes written by name ("float32", "bfloat16")."""
  out = dataclasses.asdict(cfg)
  for f in _DTYPE_FIELDS:
    out[f] = jnp.dtype(out[f]).name
  return out


def config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
  """Inverse of `config_to_dict`; unknown keys are an error (a config from another version)."""
  d = dict(d)
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"{CONFIG_FILE}: unknown ModelConfig fields {unknown}")
  for name, cls in _TOWERS.items():
    if name in d:
      sub = dict(d[name])
      bad = sorted(set(sub) - {f.name for f in dataclasses.fields(cls)})
      if bad:
        raise ValueError(f"{CONFIG_FILE}: unknown {cls.__name__} fields {bad}")
      d[name] = cls(**sub)
  for f in _DTYPE_FIELDS:
    if f in d:
      d[f] = jnp.dtype(d[f]).type
  return ModelConfig(**d)


def save_params(directory: str | os.PathLike, cfg: ModelConfig, params: Mapping[str, Any]) -> None:
  """Writes `model_config.json` and the params (nested dict of numpy or jax arrays) to `directory`.

  Refuses to overwrite an existing params directory.
  """
  directory = paths.absolute(directory)
  if (directory / PARAMS_DIR).exists():
    raise FileExistsError(f"{directory / PARAMS_DIR} already exists")
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).write_text(
    json.dumps(config_to_dict(cfg), indent=2, sort_keys=True) + "\n"
  )
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory / PARAMS_DIR, dict(params))
  ckptr.wait_until_finished()
  ckptr.close()


def load_config(directory: str | os.PathLike) -> ModelConfig:
  """Reads only `model_config.json` (e.g. to build the abstract model before restoring)."""
  path = paths.path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: not a directory written by save_params")
  return config_from_dict(json.loads(path.read_text()))


def load_params(
  directory: str | os.PathLike,
  abstract_target: Any = None,
  shardings: Any = None,
) -> tuple[ModelConfig, Any]:
  """(config, params) from a `save_params` directory.

  abstract_target: tree of `jax.ShapeDtypeStruct` (optionally with `.sharding`) or arrays with
    the saved structure, e.g. the pure dict of `nnx.eval_shape(...)`'s state. Shapes must match.
  shardings: tree of `jax.sharding.Sharding` with the same structure (e.g. from
    `x2vlm_jax.sharding.state_shardings`); arrays are restored straight into those shards.
  Neither: numpy arrays on the host.
  """
  directory = paths.absolute(directory)
  cfg = load_config(directory)
  ckptr = ocp.StandardCheckpointer()
  try:
    if abstract_target is None:
      meta = ckptr.metadata(directory / PARAMS_DIR).item_metadata
      # A ShapeDtypeStruct without sharding restores as a host numpy array.
      abstract_target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta)
    else:
      abstract_target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        abstract_target,
      )
    if shardings is not None:
      abstract_target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_target, shardings
      )
    params = ckptr.restore(directory / PARAMS_DIR, abstract_target)
  finally:
    ckptr.close()
  return cfg, params
