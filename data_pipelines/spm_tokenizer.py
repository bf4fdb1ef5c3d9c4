"""An XLM-R-style SentencePiece tokenizer trained offline on our own sentences.

The official multilingual model tokenises with transformers' `XLMRobertaTokenizer` over
xlm-roberta's SentencePiece model (docs/multilingual.md#tokenisation). For tests and the
synthetic multilingual data we train a small SentencePiece unigram model of the same kind on
the synthetic captions (no hub): `<unk>` 0, `<s>` 1, `</s>` 2, no pad piece, full character
coverage (CJK included), and write it as `sentencepiece.bpe.model` plus the transformers files,
so `AutoTokenizer.from_pretrained(dir)` gives an XLMRobertaTokenizer with the fairseq id layout
(`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, pieces shifted by one, `<mask>` last): vocabulary
size = pieces + 2.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

from data_pipelines.text_ops import pre_caption

SPM_FILE = "sentencepiece.bpe.model"


def train_xlmr_tokenizer(
  sentences: Iterable[str], out_dir: str | os.PathLike, vocab_size: int, max_words: int = 64
) -> str:
  """Trains the SentencePiece model on `sentences` (cleaned by `pre_caption` first, as the
  captions it will tokenise) and writes an XLM-R tokenizer directory; returns its path.

  vocab_size: the tokenizer's size (pieces + <pad> + <mask>); a corpus too small for it gives
    fewer pieces (SentencePiece's `hard_vocab_limit=False`), never more.
  """
  import sentencepiece as spm  # imported lazily: only needed to build a tokenizer
  from transformers import XLMRobertaTokenizer

  if vocab_size < 8:
    raise ValueError(f"vocab_size must be >= 8, got {vocab_size}")
  text = [pre_caption(s, max_words) for s in sentences]
  if not text:
    raise ValueError("no sentences to train the SentencePiece model on")
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(text),
    model_writer=buf,
    vocab_size=vocab_size - 2,
    model_type="unigram",
    character_coverage=1.0,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    hard_vocab_limit=False,
    # Short pieces: CJK captions have no spaces, and long pieces would turn whole phrases
    # ("一个大的红色圆形") into single ids that share nothing with the same words elsewhere.
    max_sentencepiece_length=4,
    num_threads=1,  # deterministic and gentle on a shared CPU
    minloglevel=2,
  )
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, SPM_FILE), "wb") as f:
    f.write(buf.getvalue())
  XLMRobertaTokenizer.from_pretrained(out_dir).save_pretrained(out_dir)
  return out_dir
