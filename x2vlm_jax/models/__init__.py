"""X2-VLM model: configs, towers, heads and the composed `X2VLM` (see docs/architecture.md)."""

from x2vlm_jax.models.config import FusionConfig, ModelConfig, TextConfig, VisionConfig
from x2vlm_jax.models.fusion import VisionKV
from x2vlm_jax.models.vision import relative_position_index, resize_rel_pos_bias
from x2vlm_jax.models.x2vlm import X2VLM, abstract_model, count_params, create_sharded

__all__ = [
  "FusionConfig",
  "ModelConfig",
  "TextConfig",
  "VisionConfig",
  "VisionKV",
  "X2VLM",
  "abstract_model",
  "count_params",
  "create_sharded",
  "relative_position_index",
  "resize_rel_pos_bias",
]
