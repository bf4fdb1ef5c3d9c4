"""Shared helpers of the converter tests: random official state dicts, exact comparison and
the small configs they run on."""

import dataclasses

import numpy as np

from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import official as O
from x2vlm_jax.convert import official_spec as S
from x2vlm_jax.models.config import FusionConfig, ModelConfig, TextConfig, VisionConfig

# Base widths (vocab 30522, 768, 12 heads, 224 px) with 1 vision block and 1 + 1 text/fusion
# layers: exercises every base shape at ~55M floats instead of 255M (too heavy for a 2-core CI).
BASE_WIDTH_SHALLOW = ModelConfig.base(
  vision=VisionConfig(depth=1), text=TextConfig(depth=1), fusion=FusionConfig(depth=1)
)
# BEiT's optional absolute position embedding (the demo's from-scratch ViT has it).
TINY_ABS_POS = ModelConfig.tiny(
  vision=dataclasses.replace(ModelConfig.tiny().vision, abs_pos_embed=True)
)


def random_official(cfg, layout=S.PRETRAIN, seed=0, normal=True):
  """Random state dict with every key/shape/dtype of the spec; buffers and ties as official.
  `normal=False` draws uniform [0, 1) floats, ~3x faster for full-size models."""
  rng = np.random.default_rng(seed)
  rules = O.official_rules(cfg)
  sd = {}
  for k, (shape, dtype) in S.official_state_spec(cfg, layout).items():
    if dtype == np.int64:
      rule, m = C.find_rule(rules, k)
      sd[k] = rule.expect(m)
    elif k in S.TIED:
      sd[k] = sd[S.TIED[k]].copy()
    else:
      draw = rng.standard_normal if normal else rng.random
      sd[k] = draw(shape, dtype=np.float32)
  return sd


def assert_same_state(a, b, ordered=True):
  if ordered:
    assert list(a) == list(b)
  assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype, x.shape, y.shape)
    assert np.array_equal(x, y), k  # bit-identical
