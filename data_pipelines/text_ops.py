"""Caption cleaning (`pre_caption`) and BERT word-piece tokenisation to fixed length.

Both follow the official pre-training text path (docs/fidelity.md#caption-cleaning,
docs/fidelity.md#tokenisation): the caption is normalised by
`pre_caption`, split into word pieces by an uncased BERT WordPiece tokenizer, and laid out as
`[CLS] + pieces[:L-1] + [SEP]` padded with `[PAD]` = 0 to exactly L tokens.

An XLM-R SentencePiece tokenizer (docs/multilingual.md#tokenisation) works the same way with
`<s>` / `</s>` around its pieces. Its `<pad>` is id 1, but batches still pad with 0: the
attention mask says which tokens are real, and the XLM-R text tower takes positions and padded
ids from the mask, so its outputs equal the official ones (`models/text.py`).

`pre_caption` on non-Latin scripts behaves as the official one: only ASCII punctuation is
replaced (the full-width "，" and "。" stay), lower-casing leaves CJK unchanged, and the
`max_words` cut counts space-separated chunks, so a Chinese or Japanese caption without spaces
is one "word" and is only cut by the tokenizer's max_tokens.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from data_pipelines.features import SkipRecord

# The characters that the official normaliser turns into a space; '-' and '/' too.
_PUNCT_RE = re.compile(r"[,.'!?\"()*#:;~\-/]")
# Only runs of two or more whitespace characters are collapsed: a single tab or newline survives
# the official normaliser, and we keep that behaviour so cleaned strings match exactly.
_MULTI_SPACE_RE = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int, record_id: str = "?", field: str = "captions") -> str:
  """Normalises a caption as the official `pre_caption` does (docs/fidelity.md#caption-cleaning).

  Lower-cases, turns the punctuation `, . ' ! ? " ( ) * # : ; ~ - /` into spaces, maps
  "<person>" to "person", collapses whitespace runs, strips, and keeps the first `max_words`
  space-separated words.

  Raises:
    SkipRecord('empty_caption') naming `record_id`/`field` when nothing (or only whitespace)
      is left, or when `text` is not a string.
  """
  if not isinstance(text, str):
    raise SkipRecord(
      "bad_field_type", record_id, field, f"caption is {type(text).__name__}, not str"
    )
  caption = _PUNCT_RE.sub(" ", text.lower()).replace("<person>", "person")
  caption = _MULTI_SPACE_RE.sub(" ", caption)
  caption = caption.rstrip("\n").strip(" ")
  words = caption.split(" ")
  if len(words) > max_words:
    caption = " ".join(words[:max_words])
  # The official code only rejects the empty string; a lone tab would later tokenise to nothing.
  # We reject whitespace-only results here so the skip reason says what actually happened.
  if not caption.strip():
    raise SkipRecord("empty_caption", record_id, field, f"nothing left of {text[:60]!r}")
  return caption


@dataclasses.dataclass(frozen=True)
class TokenizedText:
  """One caption laid out to fixed length L.

  ids:    int32 [L] `[CLS] pieces [SEP] [PAD]...`
  mask:   int32 [L] 1 for real tokens (incl. [CLS]/[SEP])
  pieces: the word-piece strings of the real tokens (length n = mask.sum()), used by
          whole-word masking ('##' marks a continuation piece)
  """

  ids: np.ndarray
  mask: np.ndarray
  pieces: tuple[str, ...]

  @property
  def length(self) -> int:
    """Number of real tokens n (including [CLS] and [SEP])."""
    return len(self.pieces)


class Tokenizer:
  """Fixed-length BERT word-piece (or XLM-R SentencePiece) tokenizer around a Hugging Face fast
  tokenizer; `sentencepiece` says which (SentencePiece pieces mark word starts with '▁' and
  have no '##' continuations, so whole-word masking does not apply to them).

  Loads with `AutoTokenizer.from_pretrained(directory)` (never `BertTokenizer(vocab_file=...)`,
  which yields all-[UNK] ids in transformers v5). Padding/truncation settings stored in
  `tokenizer.json` are switched off on a private copy of the backend so that every piece is
  seen and the layout is ours.
  """

  def __init__(self, directory: str | os.PathLike, max_tokens: int):
    import tokenizers
    from transformers import AutoTokenizer  # imported lazily: heavy, and only needed here

    if max_tokens < 3:
      raise ValueError(f"max_tokens must be >= 3 ([CLS] piece [SEP]), got {max_tokens}")
    hf = AutoTokenizer.from_pretrained(str(directory))
    if not hf.is_fast:
      raise ValueError(f"{directory}: need a fast (tokenizers-backed) BERT tokenizer")
    self.max_tokens = int(max_tokens)
    self._backend = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    self._backend.no_padding()
    self._backend.no_truncation()
    self.vocab_size = int(len(hf))
    self.cls_id = int(hf.cls_token_id)
    self.sep_id = int(hf.sep_token_id)
    self.pad_id = int(hf.pad_token_id)
    self.mask_id = int(hf.mask_token_id)
    self.cls_token, self.sep_token = hf.cls_token, hf.sep_token
    # Ids that span masking must stop at (the official rule's "special" positions).
    self.special_ids = frozenset(int(i) for i in hf.all_special_ids)
    self.sentencepiece = isinstance(self._backend.model, tokenizers.models.Unigram)
    if self.pad_id != 0 and not self.sentencepiece:
      raise ValueError(f"{directory}: [PAD] id is {self.pad_id}; the batch contract pads with 0")

  def pieces(self, caption: str) -> tuple[list[int], list[str]]:
    """Word-piece ids and strings of a cleaned caption, without special tokens."""
    enc = self._backend.encode(caption, add_special_tokens=False)
    return list(enc.ids), list(enc.tokens)

  def decode(self, ids) -> str:
    """Text of word-piece ids without special tokens (generated captions)."""
    return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)

  def __call__(self, caption: str, record_id: str = "?", field: str = "captions") -> TokenizedText:
    """Tokenises one cleaned caption into the fixed-length layout.

    Raises:
      SkipRecord('caption_no_tokens') when the caption yields no word piece.
    """
    ids, toks = self.pieces(caption)
    if not ids:
      raise SkipRecord("caption_no_tokens", record_id, field, f"{caption[:60]!r} has no word piece")
    keep = self.max_tokens - 2  # [CLS] + first (L-1) pieces, truncated to L-1, + [SEP]
    ids = [self.cls_id] + ids[:keep] + [self.sep_id]
    toks = [self.cls_token] + toks[:keep] + [self.sep_token]
    out = np.zeros(self.max_tokens, np.int32)  # [L], [PAD] = 0
    out[: len(ids)] = ids
    mask = np.zeros(self.max_tokens, np.int32)  # [L]
    mask[: len(ids)] = 1
    return TokenizedText(out, mask, tuple(toks))
