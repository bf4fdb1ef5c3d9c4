"""One MVPTR pre-training example from its parts: the two input streams and their masks, the
arrays `x2vlm_jax.mvptr_objectives.pretrain_terms` reads (one row; batch by stacking).

Stream A = [CLS] + word pieces (<= max_tokens - 2) + phrase ids (<= max_phrases) + [SEP], zero
padded to max_tokens + max_phrases; stream B's tag part = [CLS] + tag word pieces
(<= max_tags - 2) + [SEP], zero padded to max_tags; then the regions (`mvptr_regions`).
Masking, BERT-style (chosen with probability `rate`, then [MASK] 80 % / random 10 % / kept 10 %):
words with `word_rate` (0.15) for MLM; tags with `tag_rate` (paper 0.25, code 0.15) for MCR^v;
phrases with `phrase_rate` for the paper's MCR^s (the released code computes no phrase loss).
MVPTR_REFERENCE.md section 1. Not built: the code's quirks of cutting the phrase list to
max_phrases + max_tokens - 2 - len(tokens) and of masking every phrase linked to a masked word.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines import mvptr_regions


@dataclasses.dataclass(frozen=True)
class MvptrExampleSpec:
  """Lengths (pre-training: 35 tokens, 5 phrases, 20 tags, 50 regions) and special ids
  (bert-base-uncased: [PAD] 0, [CLS] 101, [SEP] 102, [MASK] 103; ordinary word pieces from 999)."""

  max_tokens: int = 35
  max_phrases: int = 5
  max_tags: int = 20
  max_regions: int = 50
  region_dim: int = 2054
  word_vocab_size: int = 30522
  vocab_size: int = 86051
  cls_id: int = 101
  sep_id: int = 102
  mask_id: int = 103
  first_word_id: int = 999  # random replacements are drawn from [first_word_id, word_vocab_size)
  word_rate: float = 0.15
  tag_rate: float = 0.25
  phrase_rate: float = 0.15


def _mask(rng, ids, chosen_p, mask_id, low, high):
  """BERT 80/10/10 over a 1-d array; returns (corrupted, labels -1 where not chosen)."""
  chosen = rng.random(ids.shape) < chosen_p
  roll = rng.random(ids.shape)
  out = np.where(chosen & (roll < 0.8), mask_id, ids)
  out = np.where(chosen & (roll >= 0.8) & (roll < 0.9), rng.integers(low, high, ids.shape), out)
  return out, np.where(chosen, ids, -1)


def build_example(rng: np.random.Generator, words, phrases, tags, regions, s: MvptrExampleSpec):
  """words / tags: word-piece ids; phrases: ids in the extended table; regions [n, region_dim].
  Returns one row of every `pretrain_terms` batch field (numpy, int32 / float32)."""
  words = np.asarray(words, np.int64)[: s.max_tokens - 2]
  phrases = np.asarray(phrases, np.int64)[: s.max_phrases]
  tags = np.asarray(tags, np.int64)[: s.max_tags - 2]
  if phrases.size and (phrases.min() < 0 or phrases.max() >= s.vocab_size):
    raise ValueError(f"phrase ids {phrases.tolist()} outside the table of {s.vocab_size}")
  w_in, w_lab = _mask(rng, words, s.word_rate, s.mask_id, s.first_word_id, s.word_vocab_size)
  p_in, p_lab = _mask(rng, phrases, s.phrase_rate, s.mask_id, s.word_vocab_size, s.vocab_size)
  t_in, t_lab = _mask(rng, tags, s.tag_rate, s.mask_id, s.first_word_id, s.word_vocab_size)
  la = s.max_tokens + s.max_phrases
  text = np.concatenate([[s.cls_id], w_in, p_in, [s.sep_id]])
  text_labels = np.full(la, -1)
  text_labels[1 : 1 + words.size] = w_lab
  start = 1 + words.size
  positions = np.zeros(s.max_phrases, np.int64)
  positions[: phrases.size] = np.arange(start, start + phrases.size)
  phrase_labels = np.full(s.max_phrases, -1)
  phrase_labels[: phrases.size] = p_lab
  tag_row = np.concatenate([[s.cls_id], t_in, [s.sep_id]])
  tag_labels = np.full(s.max_tags, -1)
  tag_labels[1 : 1 + tags.size] = t_lab
  reg, reg_mask = mvptr_regions.pad_regions(np.asarray(regions, np.float32), s.max_regions)
  if reg.shape[1] != s.region_dim:
    raise ValueError(f"regions have {reg.shape[1]} values, expected {s.region_dim}")
  i32 = lambda x: np.asarray(x, np.int32)  # noqa: E731
  return dict(
    text_ids=i32(_pad(text, la)),
    text_mask=i32(np.arange(la) < text.size),
    text_labels=i32(text_labels),
    phrase_positions=i32(positions),
    phrase_valid=i32(np.arange(s.max_phrases) < phrases.size),
    phrase_labels=i32(phrase_labels),
    tag_ids=i32(_pad(tag_row, s.max_tags)),
    tag_mask=i32(np.arange(s.max_tags) < tag_row.size),
    tag_labels=i32(tag_labels),
    regions=reg,
    region_mask=reg_mask,
  )


def _pad(x, n):
  out = np.zeros(n, np.int64)
  out[: x.size] = x
  return out
