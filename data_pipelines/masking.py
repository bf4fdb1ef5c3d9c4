"""MLM masking: whole-word + span masking with the 80/10/10 replacement rule.

The official generator draws from Python's global `random`; here every draw comes from a numpy
`Generator` seeded per example, so an example is reproducible from (seed, index) alone. The
algorithm is otherwise step for step the official one (docs/fidelity.md#mlm-masking), quirks too:
`[SEP]` is maskable, n_pred counts `[CLS]`/`[SEP]` and rounds half to even, the random
replacement draws from the whole vocabulary, and whole words can be cut by the final truncation.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.features import MLM_IDS, MLM_LABELS, MLM_POSITIONS, MLM_WEIGHTS, PreprocConfig


def num_predictions(n: int, mask_prob: float, max_masks: int) -> int:
  """n_pred = min(max_masks, max(1, round(n * mask_prob))), n counting [CLS] and [SEP].

  Python's `round` rounds half to even, as the official code does (e.g. n=5, p=0.5 -> 2).
  """
  return min(max_masks, max(1, round(n * mask_prob)))


def draw_mask_spans(
  pieces,
  rng: np.random.Generator,
  n_pred: int,
  *,
  skipgram_prb: float,
  skipgram_size: int,
  mask_whole_word: bool,
  first: int = 1,
) -> tuple[set[int], list[tuple[int, int, int]]]:
  """Walks the shuffled candidates and masks whole-word spans until >= n_pred.

  Args:
    pieces: word-piece strings of the n real tokens, `[CLS]` first (position 0 is never masked).
    n_pred: target number of masked positions.
    first: the first maskable position (1: all but [CLS]; captioning also keeps its prompt,
      the official `num_source_tokens`).

  Returns:
    (masked, spans): the masked set before truncation, and per span drawn (start candidate,
    first added position, exclusive end of the added positions), for inspection in tests.
  """
  n = len(pieces)
  cand = rng.permutation(np.arange(first, n)).tolist()  # first..n-1: [SEP] included
  last_cand = n - 1
  masked: set[int] = set()
  spans: list[tuple[int, int, int]] = []
  for pos in cand:
    if len(masked) >= n_pred:
      break
    if pos in masked:
      continue
    # Span start/end (end exclusive): a k-gram with probability skipgram_prb, k in {2..size}.
    if skipgram_prb > 0 and skipgram_size >= 2 and rng.random() < skipgram_prb:
      st, end = pos, pos + int(rng.integers(2, skipgram_size + 1))
    else:
      st, end = pos, pos + 1
    if mask_whole_word:
      # Grow to whole words: a '##' piece continues the word to its left. SentencePiece (XLM-R)
      # pieces never start with '##', so for them this is a no-op: the official code forces
      # whole-word masking off for every non-BERT tokenizer (docs/multilingual.md#tokenisation).
      while st >= 0 and pieces[st].startswith("##"):
        st -= 1
      while end < n and pieces[end].startswith("##"):
        end += 1
    stop = st
    for mp in range(st, end):
      # Stop the span at [CLS] / the prompt (the special positions) or past the last candidate.
      if first <= mp <= last_cand:
        masked.add(mp)
        stop = mp + 1
      else:
        break
    spans.append((pos, st, stop))
  return masked, spans


def choose_masked_positions(
  pieces,
  rng: np.random.Generator,
  *,
  max_masks: int,
  mask_prob: float,
  skipgram_prb: float,
  skipgram_size: int,
  mask_whole_word: bool,
  first: int = 1,
  n_tokens: int | None = None,
) -> list[int]:
  """Picks the positions to mask in one tokenised caption.

  Args:
    pieces: word-piece strings of the n real tokens, `[CLS]` first.
    rng: per-example generator.
    first: the first maskable position (`draw_mask_spans`); n_tokens: the n of n_pred when it
      is not len(pieces) (captioning: without the prompt).

  Returns:
    sorted list of masked positions: exactly n_pred of them (n - 1 >= n_pred whenever n >= 2
    and mask_prob <= 0.5; otherwise every candidate).
  """
  n = len(pieces) if n_tokens is None else n_tokens  # captioning leaves out its prompt
  n_pred = num_predictions(n, mask_prob, max_masks)
  masked, _ = draw_mask_spans(
    pieces,
    rng,
    n_pred,
    skipgram_prb=skipgram_prb,
    skipgram_size=skipgram_size,
    mask_whole_word=mask_whole_word,
    first=first,
  )
  out = sorted(masked)
  if len(out) > n_pred:
    # Truncate at random; this may cut a whole word or span (official behaviour).
    out = sorted(rng.permutation(np.asarray(out)).tolist()[:n_pred])
  return out


def choose_with(cfg: PreprocConfig, pieces, rng: np.random.Generator, **kw) -> list[int]:
  """`choose_masked_positions` with `cfg`'s masking settings (kw: `first`, `n_tokens`)."""
  return choose_masked_positions(
    pieces,
    rng,
    max_masks=cfg.max_masks,
    mask_prob=cfg.mask_prob,
    skipgram_prb=cfg.skipgram_prb,
    skipgram_size=cfg.skipgram_size,
    mask_whole_word=cfg.mask_whole_word,
    **kw,
  )


def apply_mlm(
  ids: np.ndarray,
  positions: list[int],
  rng: np.random.Generator,
  *,
  mask_id: int,
  vocab_size: int,
  max_masks: int,
) -> dict[str, np.ndarray]:
  """Replaces the chosen positions 80% [MASK] / 10% random id / 10% unchanged.

  Args:
    ids: int32 [L] unmasked ids.
    positions: masked positions (at most max_masks).

  Returns:
    mlm_ids int32 [L], mlm_positions int32 [M] (pad 0), mlm_labels int32 [M] (original ids,
    pad 0), mlm_weights float32 [M] (1 real, 0 pad).
  """
  if len(positions) > max_masks:
    raise ValueError(f"{len(positions)} masked positions > max_masks={max_masks}")
  mlm_ids = np.array(ids, dtype=np.int32, copy=True)  # [L]
  pos = np.zeros(max_masks, np.int32)  # [M]
  labels = np.zeros(max_masks, np.int32)  # [M]
  weights = np.zeros(max_masks, np.float32)  # [M]
  for k, p in enumerate(positions):
    pos[k], labels[k], weights[k] = p, ids[p], 1.0
    # Two separate draws as in the official code: P(mask)=0.8, P(random)=0.2*0.5, P(keep)=0.1.
    if rng.random() < 0.8:
      mlm_ids[p] = mask_id
    elif rng.random() < 0.5:
      # Any id of the whole vocabulary, [PAD]/[CLS]/[unusedX] included (official).
      mlm_ids[p] = rng.integers(0, vocab_size)
  return {MLM_IDS: mlm_ids, MLM_POSITIONS: pos, MLM_LABELS: labels, MLM_WEIGHTS: weights}


def mask_caption(
  ids: np.ndarray,
  pieces,
  rng: np.random.Generator,
  cfg: PreprocConfig,
  *,
  mask_id: int,
  vocab_size: int,
) -> dict[str, np.ndarray]:
  """Chooses and applies the MLM mask for one tokenised caption with `cfg`'s settings."""
  positions = choose_with(cfg, pieces, rng)
  return apply_mlm(
    ids, positions, rng, mask_id=mask_id, vocab_size=vocab_size, max_masks=cfg.max_masks
  )
