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
  """Post-LN BERT text tower (layers 0-11 of the official 18-layer stack), or XLM-R.

  kind "bert": BERT embeddings (positions 0..L-1). kind "xlmr": RoBERTa embeddings as XLM-R
  (docs/multilingual.md#xlm-r-text-tower): position of a real token = padding_idx + its rank
  among the real tokens, padded tokens sit at padding_idx; with `xlmr_text` the sizes of
  xlm-roberta-base/large (vocab 250002, 514 positions, one token type, pad id 1, eps 1e-5).
  """

  kind: str = "bert"  # "bert" | "xlmr"
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

  def __post_init__(self):
    if self.kind not in ("bert", "xlmr"):
      raise ValueError(f"TextConfig.kind must be 'bert' or 'xlmr', got {self.kind!r}")
    if self.kind == "xlmr" and self.max_positions < 3:
      raise ValueError("an XLM-R tower needs max_positions >= 3 (positions start at pad_id + 1)")

  @property
  def max_length(self) -> int:
    """Longest text the position table can hold: XLM-R positions start after padding_idx."""
    return self.max_positions - (self.pad_token_id + 1 if self.kind == "xlmr" else 0)


def xlmr_text(size: str = "base", **kw) -> TextConfig:
  """XLM-R text tower: xlm-roberta-base (12 x 768) or -large (24 x 1024), HF config values."""
  sizes = {"base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096)}
  if size not in sizes:
    raise ValueError(f"unknown XLM-R size {size!r}; expected base or large")
  width, depth, heads, mlp = sizes[size]
  cfg = TextConfig(
    kind="xlmr",
    vocab_size=250002,
    width=width,
    depth=depth,
    num_heads=heads,
    mlp_dim=mlp,
    max_positions=514,
    type_vocab_size=1,
    pad_token_id=1,
    ln_eps=1e-5,
  )
  return dataclasses.replace(cfg, **kw)


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
  # What each scanned layer keeps for the backward pass: False / "none", True / "full",
  # "save_matmuls", "save_dots" or "save_all_but_attention" (layers.REMAT_POLICIES,
  # docs/train_step.md#rematerialisation); `remat_vision` / `_text` / `_fusion`
  # override it for one tower (None = follow `remat`). The numbers are the same for all.
  remat: bool | str = False
  remat_vision: str | None = None
  remat_text: str | None = None
  remat_fusion: str | None = None  # also the VQA answer decoder's layers
  # Layers per iteration of each tower's layer loop (`lax.scan` unroll): 1 = a rolled loop
  # (default: compile time independent of depth), True = every layer inlined. Same numbers and
  # parameter layout either way; unrolling removes the loop's stacked-buffer bookkeeping, which
  # pays on op-bound small models (docs/benchmarks.md#unrolled-layer-loops) and costs compile time.
  scan_unroll: int | bool = 1
  # Attention core: "einsum" (default), "xla" or "cudnn" (`jax.nn.dot_product_attention`;
  # models/attention.py says where each applies and when it falls back).
  attention: str = "einsum"
  # Fine-tuning heads, optional parts of the model (absent by default; docs/finetuning.md):
  decoder_layers: int = 0  # VQA answer decoder `text_decoder` (official: 6 layers); 0 = none
  cls_labels: int = 0  # classes of `cls_head` (NLVR2 2, MSRVTT-QA 1500); 0 = no cls_head
  cls_inputs: int = 1  # fused [CLS] vectors concatenated into cls_head (NLVR2: 2 images)
  # Official `XVLMPlusBase` layout (docs/multilingual.md#layout): the fusion tower is a separate
  # 6-layer BERT cross encoder (its own `cross_encoder.*` keys) and the MLM head (`mlm_head.*`)
  # has its own, untied decoder matrix. Structure and computation of the towers are unchanged.
  xvlm_plus: bool = False

  def __post_init__(self):
    u = self.scan_unroll
    if not isinstance(u, bool) and not (isinstance(u, int) and u >= 1):
      raise ValueError(
        f"scan_unroll {u!r} (config.model.scan_unroll) is not a positive layer count or a bool"
      )

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def tower_remat(self, tower: str) -> bool | str:
    """The remat setting of "vision", "text" or "fusion": its own override, else `remat`."""
    own = getattr(self, f"remat_{tower}")
    return self.remat if own is None else own

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
  def xlmr_tiny(cls, **kw) -> "ModelConfig":
    """`tiny` with a 2-layer XLM-R-style tower (vocab 300, 40 wide) in the XVLMPlus layout."""
    text = xlmr_text(width=40, depth=2, num_heads=4, mlp_dim=56, vocab_size=300, max_positions=66)
    return dataclasses.replace(cls.tiny(text=text, xvlm_plus=True), **kw)

  @classmethod
  def xlmr_base(cls, **kw) -> "ModelConfig":
    """Multilingual X2-VLM base (`cclm_x2vlm_base`): BEiT-2 B/16 + XLM-R base + bert-base 6-layer
    cross encoder, XVLMPlus layout with its untied MLM head: 615,540,825 parameters."""
    return dataclasses.replace(cls(text=xlmr_text("base"), xvlm_plus=True), **kw)

  @classmethod
  def xlmr_large(cls, **kw) -> "ModelConfig":
    """Multilingual X2-VLM large (`cclm_x2vlm_large`): BEiT-2 L/16 + XLM-R large + the 6-layer
    1024-wide cross encoder, XVLMPlus layout with its untied MLM head: 1,225,073,817 parameters."""
    large = cls.large(frame_len=0, text=xlmr_text("large"), xvlm_plus=True)
    return dataclasses.replace(large, **kw)

  @classmethod
  def named(cls, name: str, **kw) -> "ModelConfig":
    factories = {
      "tiny": cls.tiny,
      "base": cls.base,
      "large": cls.large,
      "demo": cls.demo,
      "xlmr_tiny": cls.xlmr_tiny,
      "xlmr_base": cls.xlmr_base,
      "xlmr_large": cls.xlmr_large,
    }
    if name not in factories:
      raise ValueError(f"unknown model variant {name!r}; expected one of {sorted(factories)}")
    return factories[name](**kw)


def remat_fields(remat: bool, policy: str) -> dict:
  """ModelConfig remat fields from a run config's `model.remat` and `model.remat_policy`:
  '' = `remat` (False: none, True: full) for every tower; a policy name ("save_matmuls") for
  every tower; or per tower "vision=save_matmuls,text=none,fusion=full" (towers not named follow
  `remat`). Policies go into the per-tower fields, so `remat` stays the config's bool."""
  towers = ("vision", "text", "fusion")
  if "=" not in policy:
    return {"remat": remat, **({f"remat_{t}": policy for t in towers} if policy else {})}
  out = {"remat": remat}
  for part in filter(None, (p.strip() for p in policy.split(","))):
    tower, _, name = part.partition("=")
    if tower not in towers or not name:
      raise ValueError(
        f"config.model.remat_policy {policy!r}: {part!r} is not tower=policy with tower one of "
        "vision, text, fusion"
      )
    out[f"remat_{tower}"] = name
  return out
