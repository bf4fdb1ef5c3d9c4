"""Typed sizes of the MVPTR model (docs/mvptr.md): three equal post-LN BERT stacks over a shared
word + phrase embedding table and 2054-d detector region vectors.

Facts: /work/shared/reference/MVPTR_REFERENCE.md section 2 (official `BiBertImgModel` and
`BiBertImgForPreTraining` of Junction4Nako/mvp_pytorch). `tiny` uses odd widths so that a
transposed kernel fails loudly in tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from x2vlm_jax.models.config import TextConfig

# Rows of the extended table: ids 0..86,050 are used by `id2phrase_new.json` (max phrase id 86,050,
# ids not contiguous), so the table needs 86,051 rows; the released config's `vocab_size` was not
# inspected (reference section 8), so this is the smallest table that holds every phrase id.
MVPTR_VOCAB_SIZE = 86051
BERT_WORD_VOCAB_SIZE = 30522  # `only_word_size`: bert-base-uncased WordPiece ids

# The head set of each official model class (docs/mvptr.md#fine-tuning): "pretrain" =
# `BiBertImgForPreTraining` (logit_scale, ITM, the two MLM heads, optional qa_head); "retrieval" =
# `BiImageBertForRetrieval` (logit_scale, `classifier` Linear(D, 2)); "vqa" = `BiImageBertForVQA`
# (`cls.predictions` = BertQAPredictionHead over `qa_answers`); "ve" =
# `BiImageBertForSequenceClassification` (`classifier` Linear(D, 3)); "grounding" =
# `BiImageBertForRE` (`classifier` Linear(D, 1), unused by its cosine loss but in the file).
HEAD_SETS = ("pretrain", "retrieval", "vqa", "ve", "grounding")
CLASSIFIER_LABELS = {"retrieval": 2, "ve": 3, "grounding": 1}


@dataclasses.dataclass(frozen=True)
class MvptrConfig:
  """The whole MVPTR model. Each of the three stacks has `depth` layers (official: half of
  BERT-base's 12, `num_hidden_layers // 2`)."""

  vocab_size: int = MVPTR_VOCAB_SIZE  # words + phrase ids: one embedding table
  word_vocab_size: int = BERT_WORD_VOCAB_SIZE  # rows the MLM decoders are tied to
  width: int = 768
  depth: int = 6  # per stack (textual, visual, cross-modal)
  num_heads: int = 12
  mlp_dim: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2  # text = 0, tags = 1
  region_dim: int = 2054  # 2048 detector feature + 6 box values
  ln_eps: float = 1e-12
  dropout: float = 0.1  # hidden and attention-probability dropout
  # Index of the cross-modal layer whose output is the "phrase-layer" state (official
  # `phrase_layer` 2 = the third layer; the paper's WPG works at layer 3).
  phrase_layer: int = 2
  itm_classes: int = 2  # `cls.seq_relationship` (official `num_contrast_classes`, 2 or 3)
  qa_answers: int = 0  # rows of `qa_head` (pretrain) or of the VQA head (heads "vqa"); 0 = none
  heads: str = "pretrain"  # which official class's heads the model carries (HEAD_SETS)
  # The paper's textual MCR head (not in the released code): an MLM-style head on the textual
  # stack decoding over the *whole* table (words + phrases), tied to it. Off = the official tree.
  phrase_head: bool = False
  logit_scale_init: float = 2.6592600369644165  # ln(1 / 0.07)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  def __post_init__(self):
    if not 0 < self.word_vocab_size <= self.vocab_size:
      raise ValueError(
        f"word_vocab_size {self.word_vocab_size} must be in (0, vocab_size {self.vocab_size}]"
      )
    if not 0 <= self.phrase_layer < self.depth:
      raise ValueError(f"phrase_layer {self.phrase_layer} must be in [0, depth {self.depth})")
    if self.heads not in HEAD_SETS:
      raise ValueError(f"MvptrConfig.heads must be one of {HEAD_SETS}, got {self.heads!r}")
    if self.heads == "vqa" and self.qa_answers <= 0:
      raise ValueError("MvptrConfig(heads='vqa') needs qa_answers > 0 (official 3,129)")
    if self.heads != "pretrain" and self.phrase_head:
      raise ValueError("phrase_head is a pre-training head: it needs heads='pretrain'")

  @property
  def classifier_labels(self) -> int:
    """Outputs of the fine-tuning `classifier` Linear (0 = no such head)."""
    return CLASSIFIER_LABELS.get(self.heads, 0)

  def replace(self, **kw) -> "MvptrConfig":
    return dataclasses.replace(self, **kw)

  def stack(self) -> TextConfig:
    """One stack as our BERT text layers see it (`text.TextLayer`)."""
    return TextConfig(
      vocab_size=self.vocab_size,
      width=self.width,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      max_positions=self.max_positions,
      type_vocab_size=self.type_vocab_size,
      ln_eps=self.ln_eps,
      dropout=self.dropout,
    )

  @classmethod
  def tiny(cls, **kw) -> "MvptrConfig":
    """Odd sizes, 3 layers per stack (phrase layer 1), 14-d regions, for fast CPU tests."""
    base = cls(
      vocab_size=97,
      word_vocab_size=61,
      width=40,
      depth=3,
      num_heads=4,
      mlp_dim=56,
      max_positions=48,
      region_dim=14,
      phrase_layer=1,
    )
    return dataclasses.replace(base, **kw)

  @classmethod
  def base(cls, **kw) -> "MvptrConfig":
    """Three 6-layer BERT-base stacks, 86,051-row table: 198,660,471 parameters without the
    `qa_head` (tests/test_mvptr_model.py)."""
    return dataclasses.replace(cls(), **kw)
