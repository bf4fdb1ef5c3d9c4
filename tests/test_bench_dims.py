"""bench/dims.py: a model given by its dimensions (the official tiny case of issue 19)."""

import dataclasses
import importlib.util
import pathlib

import pytest

from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.models.x2vlm import count_params

_SPEC = importlib.util.spec_from_file_location(
  "bench_dims", pathlib.Path(__file__).resolve().parents[1] / "bench" / "dims.py"
)
dims = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(dims)


def test_official_tiny_dimensions():
  cfg = dims.with_dims(ModelConfig.tiny(), dims.OFFICIAL_TINY)
  for tower in (cfg.vision, cfg.text):
    assert (tower.width, tower.num_heads, tower.mlp_dim, tower.depth) == (64, 4, 256, 2)
  assert (cfg.fusion.num_heads, cfg.fusion.mlp_dim, cfg.fusion.depth) == (4, 256, 2)
  assert cfg.text.vocab_size == 1024 and cfg.embed_dim == 32
  at_96 = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=96))
  assert count_params(at_96) == 481_255  # as bench/train_step.py reports


def test_per_tower_keys_and_errors():
  cfg = dims.with_dims(ModelConfig.tiny(), "vision_width=48,vision_heads=3,layers=1,patch=8")
  assert (cfg.vision.width, cfg.vision.num_heads, cfg.vision.patch_size) == (48, 3, 8)
  assert cfg.text.width == ModelConfig.tiny().text.width
  assert (cfg.vision.depth, cfg.text.depth, cfg.fusion.depth) == (1, 1, 1)
  with pytest.raises(SystemExit, match="unknown keys"):
    dims.with_dims(ModelConfig.tiny(), "widht=64")
  with pytest.raises(SystemExit, match="vision\\+text\\+fusion"):
    dims.with_dims(ModelConfig.tiny(), "layers=2+2")
  with pytest.raises(SystemExit, match="not key=value"):
    dims.with_dims(ModelConfig.tiny(), "width")
