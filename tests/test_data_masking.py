"""Statistical tests of the MLM masking generator on 10k synthetic captions.

The official rules: docs/fidelity.md#mlm-masking.
"""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines import assets, masking
from data_pipelines.features import PreprocConfig
from data_pipelines.text_ops import Tokenizer, pre_caption

# Plain words and words that the uncased BERT vocabulary splits into several pieces.
_WORDS = (
  "a man woman dog cat on the in with near red blue small big street table holding "
  "riding standing next to of two people field grass water beach sky"
).split()
_MULTI = (
  "snowboarder skateboarding xylophones unbelievably giraffes surfboards windsurfer "
  "zebras paraglider motorcyclists sunbathing croissants"
).split()
N_CAPTIONS = 10_000


def _captions(n: int, seed: int = 0) -> list[str]:
  """Random captions of 2-24 words, a quarter of them multi-piece words."""
  rng = np.random.default_rng(seed)
  lens = rng.integers(2, 25, size=n)
  multi = rng.random((n, 24)) < 0.25
  pick = rng.integers(0, 1 << 30, size=(n, 24))
  out = []
  for i in range(n):
    words = [
      _MULTI[pick[i, j] % len(_MULTI)] if multi[i, j] else _WORDS[pick[i, j] % len(_WORDS)]
      for j in range(lens[i])
    ]
    out.append(" ".join(words).capitalize() + ".")
  return out


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(assets.minilm_dir(), max_tokens=40)


@pytest.fixture(scope="module")
def masked(tok):
  """10k captions tokenised and masked with the released settings; one rng per caption."""
  cfg = PreprocConfig()
  rows = []
  for i, cap in enumerate(_captions(N_CAPTIONS)):
    t = tok(pre_caption(cap, cfg.max_tokens))
    rng = np.random.default_rng([7, i])
    out = masking.mask_caption(
      t.ids, t.pieces, rng, cfg, mask_id=tok.mask_id, vocab_size=tok.vocab_size
    )
    rows.append((t, out))
  return cfg, rows


def test_multi_piece_words_exist(tok):
  pieces = [tok.pieces(w)[1] for w in _MULTI]
  assert all(len(p) >= 2 and p[1].startswith("##") for p in pieces), pieces


def test_num_predictions_round_half_even():
  assert masking.num_predictions(5, 0.5, 12) == 2  # 2.5 -> 2
  assert masking.num_predictions(7, 0.5, 12) == 4  # 3.5 -> 4
  assert masking.num_predictions(3, 0.2, 12) == 1  # 0.6 -> 1
  assert masking.num_predictions(2, 0.1, 12) == 1  # max(1, 0)
  assert masking.num_predictions(40, 0.5, 12) == 12


def test_mask_counts_and_layout(masked):
  cfg, rows = masked
  sep_masked = 0
  for t, out in rows:
    n = t.length
    w = out["mlm_weights"]
    k = int(w.sum())
    assert k == masking.num_predictions(n, cfg.mask_prob, cfg.max_masks)
    assert np.all(w[:k] == 1) and np.all(w[k:] == 0)
    pos = out["mlm_positions"][:k]
    assert np.all(out["mlm_positions"][k:] == 0) and np.all(out["mlm_labels"][k:] == 0)
    assert len(set(pos.tolist())) == k
    assert pos.min() >= 1 and pos.max() <= n - 1  # never [CLS], never padding
    np.testing.assert_array_equal(out["mlm_labels"][:k], t.ids[pos])
    # Unmasked positions (and [CLS], padding) keep their ids.
    keep = np.ones(len(t.ids), bool)
    keep[pos] = False
    np.testing.assert_array_equal(out["mlm_ids"][keep], t.ids[keep])
    assert out["mlm_ids"][0] == 101 and out["mlm_ids"].dtype == np.int32
    sep_masked += int((n - 1) in pos)
  assert sep_masked > 100  # [SEP] is a candidate (official quirk)


def test_replacement_split_80_10_10(masked, tok):
  _, rows = masked
  n_mask = n_same = n_rand = 0
  rand_ids = []
  for t, out in rows:
    k = int(out["mlm_weights"].sum())
    pos = out["mlm_positions"][:k]
    new, old = out["mlm_ids"][pos], t.ids[pos]
    is_mask = new == tok.mask_id
    n_mask += int(is_mask.sum())
    n_same += int((~is_mask & (new == old)).sum())
    n_rand += int((~is_mask & (new != old)).sum())
    rand_ids.extend(new[~is_mask & (new != old)].tolist())
  total = n_mask + n_same + n_rand
  assert total > 50_000
  assert abs(n_mask / total - 0.8) < 0.02
  assert abs(n_rand / total - 0.1) < 0.02
  assert abs(n_same / total - 0.1) < 0.02
  # Random ids come from the whole vocabulary (both halves of the id range are hit).
  rand_ids = np.asarray(rand_ids)
  assert rand_ids.min() < 2000 and rand_ids.max() > 28000


def test_whole_word_closure_before_truncation(tok):
  """Every span covers whole words; the final set is an n_pred subset of it."""
  cfg = PreprocConfig()
  cut = checked = 0
  for i, cap in enumerate(_captions(2000, seed=1)):
    t = tok(pre_caption(cap, cfg.max_tokens))
    p = t.pieces
    n_pred = masking.num_predictions(t.length, cfg.mask_prob, cfg.max_masks)
    full, _ = masking.draw_mask_spans(
      p,
      np.random.default_rng(i),
      n_pred,
      skipgram_prb=cfg.skipgram_prb,
      skipgram_size=cfg.skipgram_size,
      mask_whole_word=True,
    )
    for q in full:
      if p[q].startswith("##"):
        assert q - 1 in full, (p, sorted(full))  # its head / previous piece is masked
      if q + 1 < t.length and p[q + 1].startswith("##"):
        assert q + 1 in full, (p, sorted(full))  # its continuation pieces are masked
    assert len(full) >= n_pred
    final = masking.choose_masked_positions(
      p,
      np.random.default_rng(i),
      max_masks=cfg.max_masks,
      mask_prob=cfg.mask_prob,
      skipgram_prb=cfg.skipgram_prb,
      skipgram_size=cfg.skipgram_size,
      mask_whole_word=True,
    )
    assert set(final) <= full and len(final) == n_pred
    if len(full) == n_pred:
      assert set(final) == full
    # Count '##' pieces whose word got cut by the truncation.
    for q in final:
      if p[q].startswith("##"):
        checked += 1
        cut += int(q - 1 not in final)
  assert checked > 1000
  assert 0 < cut / checked < 0.5  # truncation sometimes cuts, whole words dominate


def test_whole_word_off_masks_single_pieces(tok):
  t = tok("xylophones xylophones xylophones")
  seen_partial = False
  for i in range(200):
    pos = masking.choose_masked_positions(
      t.pieces,
      np.random.default_rng(i),
      max_masks=12,
      mask_prob=0.15,
      skipgram_prb=0.0,
      skipgram_size=3,
      mask_whole_word=False,
    )
    assert len(pos) == masking.num_predictions(t.length, 0.15, 12)
    seen_partial |= any(t.pieces[q].startswith("##") and q - 1 not in pos for q in pos)
  assert seen_partial


def test_span_rate_matches_skipgram_prb(tok):
  """Spans that extend past a one-piece start word occur at rate skipgram_prb, k in {2, 3}."""
  cfg = PreprocConfig()
  lengths = {2: 0, 3: 0}
  multi = eligible = 0
  for i, cap in enumerate(_captions(4000, seed=2)):
    t = tok(pre_caption(cap, cfg.max_tokens))
    p, n = t.pieces, t.length
    n_pred = masking.num_predictions(n, cfg.mask_prob, cfg.max_masks)
    _, spans = masking.draw_mask_spans(
      p,
      np.random.default_rng(i),
      n_pred,
      skipgram_prb=cfg.skipgram_prb,
      skipgram_size=cfg.skipgram_size,
      mask_whole_word=True,
    )
    for pos, st, stop in spans:
      # Only one-piece start words with room for a 3-gram before the last candidate (n-1).
      if pos + 2 > n - 1 or p[pos].startswith("##") or p[pos + 1].startswith("##"):
        continue
      eligible += 1
      if stop > pos + 1:
        multi += 1
        if pos + 3 < n and not any(p[q].startswith("##") for q in (pos + 2, pos + 3)):
          lengths[stop - pos] += 1  # no whole-word growth: the span is exactly the k-gram
  assert eligible > 5_000
  assert abs(multi / eligible - cfg.skipgram_prb) < 0.02
  frac2 = lengths[2] / (lengths[2] + lengths[3])
  assert lengths[2] + lengths[3] > 500 and 0.4 < frac2 < 0.6


def test_reproducible_from_seed(tok):
  t = tok("a snowboarder jumping over gigantic xylophones near two zebras")
  cfg = PreprocConfig()
  a = masking.mask_caption(
    t.ids, t.pieces, np.random.default_rng(3), cfg, mask_id=103, vocab_size=30522
  )
  b = masking.mask_caption(
    t.ids, t.pieces, np.random.default_rng(3), cfg, mask_id=103, vocab_size=30522
  )
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
