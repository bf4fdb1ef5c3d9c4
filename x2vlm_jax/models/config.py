"""Typed, named architecture sizes for the three towers and the whole model.

A frozen dataclass per tower plus a variant table; `ModelConfig.tiny/base/large` compose them.
`tiny` uses deliberately unusual widths (36, 40, 52, 56, 24) so that a transposed kernel or a
swapped head/feature axis fails loudly in tests instead of going unnoticed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """BEiT-2 ViT as configured by the official code (docs/fidelity.md#beit-2-vision-tower)."""

  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 16
  image_size: int = 224
  drop_path_rate: float = 0.1  # linspace(0, rate, depth); hard-coded 0.1 in the official code
  layer_scale_init: float = 0.1
  ln_eps: float = 1e-6
  # BEiT's optional learned absolute position embedding (official `use_abs_pos_emb`), off in every
  # released X2-VLM model; the demo's from-scratch ViT uses it to locate boxes within minutes.
  abs_pos_embed: bool = False
  # Its initial values: "trunc_normal" (BEiT's, std 0.02) or "sincos" (fixed 2-D sine-cosine
  # values of the patch grid, as MAE; still trained). A from-scratch tower learns positions from
  # sincos at once, where a random table first has to be taught them by the losses.
  pos_embed_init: str = "trunc_normal"

  @property
  def grid(self) -> int:  # P: patches per side
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:  # T
    return self.grid**2

  @property
  def num_rel(self) -> int:  # rows of the relative-position-bias table
    return (2 * self.grid - 1) ** 2 + 3


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Post-LN BERT text tower (layers 0-11 of the official 18-layer stack)."""

  vocab_size: int = 30522
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2
  pad_token_id: int = 0
  ln_eps: float = 1e-12
  dropout: float = 0.1  # hidden and attention-probability dropout
  # Official `text_drop_path_rate` (0 in pre-training, 0.1 in the RefCOCO+ grounding fine-tune):
  # per-layer rates linspace(0, rate, depth) of a drop path on the attention and FFN outputs that
  # drops whole token positions for the whole batch (docs/fidelity.md#text-drop-path). Above 0 it
  # replaces the layers' hidden dropout (which becomes 0); attention-probability and embedding
  # dropout stay at `dropout`.
  drop_path_rate: float = 0.0


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  """Fusion tower: self-attn -> cross-attn (to vision) -> FFN, post-LN, text width."""

  depth: int = 6
  num_heads: int = 12
  mlp_dim: int = 3072
  ln_eps: float = 1e-12
  dropout: float = 0.1
  # Additive key-mask value of cross-attention (transformers 4.12 `invert_attention_mask`, fp32).
  cross_mask_value: float = -1e9
  # Official `cross_drop_path_rate`: as TextConfig.drop_path_rate, over the fusion layers'
  # self-attention, cross-attention and FFN outputs (hidden dropout 0 in this tower when above 0).
  drop_path_rate: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The whole X2-VLM model. `frame_len` > 0 adds the learned video frame embedding."""

  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  fusion: FusionConfig = FusionConfig()
  embed_dim: int = 256  # ITC projection size
  temp_init: float = 0.07
  temp_min: float = 0.001
  temp_max: float = 0.5
  head_ln_eps: float = 1e-5  # LayerNorm inside the ITM/box MLP heads (PyTorch default)
  frame_len: int = 0  # 0: no video frame embedding
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32
  remat: bool = False  # rematerialise each transformer block in the backward pass
  # Fine-tuning heads, optional parts of the model (absent by default; docs/finetuning.md):
  decoder_layers: int = 0  # VQA answer decoder `text_decoder` (official: 6 layers); 0 = none
  cls_labels: int = 0  # classes of `cls_head` (NLVR2 2, MSRVTT-QA 1500); 0 = no cls_head
  cls_inputs: int = 1  # fused [CLS] vectors concatenated into cls_head (NLVR2: 2 images)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def tiny(cls, **kw) -> "ModelConfig":
    """Oddly sized, 2-layer towers at 64 px (P=4, T=16) for fast CPU tests."""
    base = cls(
      vision=VisionConfig(width=36, depth=2, num_heads=3, mlp_dim=52, image_size=64),
      text=TextConfig(width=40, depth=2, num_heads=4, mlp_dim=56, max_positions=64),
      fusion=FusionConfig(depth=2, num_heads=4, mlp_dim=56),
      embed_dim=24,
    )
    return dataclasses.replace(base, **kw)

  @classmethod
  def base(cls, **kw) -> "ModelConfig":
    """BEiT-2 B/16 + bert-base (12 text + 6 fusion layers): 254,758,401 parameters."""
    return dataclasses.replace(cls(), **kw)

  @classmethod
  def large(cls, **kw) -> "ModelConfig":
    """BEiT-2 L/16 + 1024-wide BERT; with frame_len=3: 592,952,129 parameters."""
    base = cls(
      vision=VisionConfig(width=1024, depth=24, num_heads=16, mlp_dim=4096),
      text=TextConfig(width=1024, depth=12, num_heads=16, mlp_dim=4096),
      fusion=FusionConfig(depth=6, num_heads=16, mlp_dim=4096),
      frame_len=3,
    )
    return dataclasses.replace(base, **kw)

  @classmethod
  def demo(cls, **kw) -> "ModelConfig":
    """The CPU demo (configs/demo.py): a small ViT (192 wide, 4 blocks) trained from scratch at
    128 px (8x8 patches) and the MiniLM-L6-H384 BERT as text tower (its layers 4-5 are copied
    into the 2 fusion layers), so it loads the packaged MiniLM weights unchanged. Unlike the
    released models its ViT has BEiT's optional absolute position embedding: a from-scratch
    tower with only relative position biases has no cheap way to tell where a patch is, and the
    box head must say where a phrase is after a few hundred CPU steps."""
    base = cls(
      vision=VisionConfig(
        width=192,
        depth=4,
        num_heads=3,
        mlp_dim=768,
        image_size=128,
        drop_path_rate=0.0,
        abs_pos_embed=True,
        pos_embed_init="sincos",
      ),
      text=TextConfig(width=384, depth=6, num_heads=12, mlp_dim=1536),
      fusion=FusionConfig(depth=2, num_heads=12, mlp_dim=1536),
      embed_dim=128,
    )
    return dataclasses.replace(base, **kw)

  @classmethod
  def named(cls, name: str, **kw) -> "ModelConfig":
    try:
      factory = {"tiny": cls.tiny, "base": cls.base, "large": cls.large, "demo": cls.demo}[name]
    except KeyError:
      raise ValueError(
        f"unknown model variant {name!r}; expected tiny, base, large or demo"
      ) from None
    return factory(**kw)
