"""Shared pieces of the MVPTR tests: a tiny model with random (not default) parameters filled on
the host, and hand-made inputs of the two streams."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from x2vlm_jax import treepath
from x2vlm_jax.models.mvptr import MVPTR, abstract_mvptr
from x2vlm_jax.models.mvptr_config import MvptrConfig


def random_model(cfg: MvptrConfig, seed: int = 0) -> MVPTR:
  """Every parameter random (LayerNorm scales near 1), so a swapped or transposed weight shows."""
  graphdef, state = nnx.split(abstract_mvptr(cfg))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = treepath.path_str(path, "/")
    if "norm" in name and name.endswith("scale"):
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), s.dtype)
    return jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)

  state = jax.tree_util.tree_map_with_path(fill, state)
  return nnx.merge(graphdef, state)


def inputs(
  cfg: MvptrConfig, seed: int = 1, batch: int = 3, la: int = 9, tags: int = 5, regs: int = 7
):
  """Text ids (words and phrase ids) with padding, tags with padding, regions with padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, cfg.vocab_size, (batch, la))
  a_len = np.array([la, la - 3, 4][:batch])
  a_mask = (np.arange(la)[None] < a_len[:, None]).astype(np.int32)
  tag_ids = rng.integers(1, cfg.word_vocab_size, (batch, tags))
  t_len = np.array([tags, 3, 2][:batch])
  t_mask = (np.arange(tags)[None] < t_len[:, None]).astype(np.int32)
  regions = rng.standard_normal((batch, regs, cfg.region_dim)).astype(np.float32)
  r_len = np.array([regs, regs - 2, 3][:batch])
  r_mask = (np.arange(regs)[None] < r_len[:, None]).astype(np.int32)
  return dict(
    ids=ids * a_mask, a_mask=a_mask, tag_ids=tag_ids * t_mask, t_mask=t_mask,
    regions=regions * r_mask[..., None], r_mask=r_mask,
  )  # fmt: skip
