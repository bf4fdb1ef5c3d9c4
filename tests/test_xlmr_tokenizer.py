"""XLM-R tokenisation (docs/multilingual.md#tokenisation): a SentencePiece model trained here on
the synthetic multilingual captions, our fixed-length Tokenizer vs transformers'
XLMRobertaTokenizer and vs the official slow tokenizer's definition (SentencePiece pieces with
the fairseq id shift), pre_caption on non-Latin scripts, MLM masking over SentencePiece pieces."""

import numpy as np
import pytest

from data_pipelines import masking, spm_tokenizer, synthetic_multilingual
from data_pipelines.features import MLM_IDS, MLM_LABELS, MLM_POSITIONS, PreprocConfig, SkipRecord
from data_pipelines.text_ops import Tokenizer, pre_caption

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

L = 24
SENTENCES = {  # >= 4 languages, two non-Latin scripts, words the corpus never saw too
  "en": "A large red circle and a small, blue square!",
  "de": "Ein großer roter Kreis; daneben läuft ein Hund.",
  "fr": "Une image de un petit carré jaune (très joli).",
  "cs": "Velký červený kruh a malý modrý čtverec na stole.",
  "zh": "一个大的红色圆形和一只猫。",
  "ja": "大きい赤い円と小さい青い正方形の画像です",
  "long": " ".join(["a small purple diamond"] * 12),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  corpus = synthetic_multilingual.caption_corpus(max_shapes=1)
  return spm_tokenizer.train_xlmr_tokenizer(corpus, tmp_path_factory.mktemp("xlmr_tok"), 120)


def _official_ids(sp, caption):
  """The official XLMRobertaTokenizer's ids: <s> + pieces (SentencePiece id + 1, its <unk> ->
  3) truncated to L - 2 + </s>."""
  ids = [3 if i == 0 else i + 1 for i in sp.encode(caption)]
  return [0] + ids[: L - 2] + [2]


def test_tokenizer_parity_with_transformers_and_sentencepiece(tok_dir):
  ours = Tokenizer(tok_dir, L)
  assert ours.sentencepiece and ours.pad_id == 1 and (ours.cls_id, ours.sep_id) == (0, 2)
  theirs = transformers.XLMRobertaTokenizer.from_pretrained(tok_dir)
  sp = spm.SentencePieceProcessor(model_file=f"{tok_dir}/{spm_tokenizer.SPM_FILE}")
  assert ours.vocab_size == len(theirs) == sp.get_piece_size() + 2
  assert ours.mask_id == theirs.mask_token_id == ours.vocab_size - 1
  unk_seen = False
  for lang, raw in SENTENCES.items():
    caption = pre_caption(raw, 40)
    got = ours(caption)
    want = theirs(caption, padding="max_length", truncation=True, max_length=L)
    n = int(got.mask.sum())
    assert list(got.mask) == list(want["attention_mask"]), lang
    assert list(got.ids[:n]) == list(want["input_ids"][:n]), lang
    assert list(got.ids[:n]) == _official_ids(sp, caption), lang
    assert (got.ids[n:] == 0).all() and all(i == 1 for i in want["input_ids"][n:])
    assert list(got.pieces[1:-1]) == theirs.tokenize(caption)[: n - 2], lang
    unk_seen |= 3 in got.ids[:n]
  assert unk_seen  # the unseen characters (猫, 。) map to <unk> in all three


def test_pre_caption_non_latin_as_official():
  # ASCII punctuation becomes a space, full-width punctuation stays; CJK is not lower-cased.
  assert (
    pre_caption("一个红色的圆形，和一个蓝色的方形。", 30) == "一个红色的圆形，和一个蓝色的方形。"
  )
  assert pre_caption("红色圆形,蓝色方形.", 30) == "红色圆形 蓝色方形"
  assert pre_caption("大きい赤い円!  Und ÄPFEL", 30) == "大きい赤い円 und äpfel"
  # max_words counts space-separated chunks: an unspaced CJK sentence is one word.
  assert (
    pre_caption("一个大的红色圆形和一个小的蓝色正方形", 1) == "一个大的红色圆形和一个小的蓝色正方形"
  )
  assert pre_caption("红色 圆形 蓝色 方形", 2) == "红色 圆形"
  with pytest.raises(SkipRecord, match="empty_caption"):
    pre_caption("...", 5)


def test_mlm_masking_over_sentencepiece_pieces(tok_dir):
  ours = Tokenizer(tok_dir, L)
  cfg = PreprocConfig(max_tokens=L, mask_whole_word=False, max_masks=6, mask_prob=0.5)
  tok = ours(pre_caption(SENTENCES["zh"], 40))
  n = tok.length
  out = masking.mask_caption(
    tok.ids,
    tok.pieces,
    np.random.default_rng(0),
    cfg,
    mask_id=ours.mask_id,
    vocab_size=ours.vocab_size,
  )
  pos = out[MLM_POSITIONS][out[MLM_POSITIONS] > 0]
  assert len(pos) == masking.num_predictions(n, 0.5, 6) and (pos < n).all()
  np.testing.assert_array_equal(out[MLM_LABELS][: len(pos)], tok.ids[pos])
  assert (out[MLM_IDS][pos] == ours.mask_id).any()
  # The official code forces whole-word masking off for non-BERT tokenizers; over SentencePiece
  # pieces our whole-word rule never fires, so both settings mask the same positions and ids.
  for seed in range(20):
    a, b = (
      masking.mask_caption(
        tok.ids,
        tok.pieces,
        np.random.default_rng(seed),
        PreprocConfig(max_tokens=L, mask_whole_word=wwm, max_masks=6, mask_prob=0.5),
        mask_id=ours.mask_id,
        vocab_size=ours.vocab_size,
      )
      for wwm in (True, False)
    )
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
