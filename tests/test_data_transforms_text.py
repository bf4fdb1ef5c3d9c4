"""pre_caption on tricky strings and fixed-length tokenisation.

The official rules: docs/fidelity.md#caption-cleaning, docs/fidelity.md#tokenisation.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from data_pipelines import assets
from data_pipelines.features import SkipRecord
from data_pipelines.text_ops import Tokenizer, pre_caption


@pytest.mark.parametrize(
  "raw,max_words,expect",
  [
    ("A Man's dog!!", 30, "a man s dog"),
    ("  Two   dogs, (running) on: the beach;  ", 30, "two dogs running on the beach"),
    ("<PERSON> riding a horse", 30, "person riding a horse"),  # lower-cased first
    ("well-known / famous", 30, "well known famous"),
    ("end of line.\n", 30, "end of line"),
    ("hello\tworld", 30, "hello\tworld"),  # a single tab is not collapsed (official behaviour)
    ("hello\t\tworld", 30, "hello world"),
    ('Café ÜBER ~ *star* #1 "quoted"', 30, "café über star 1 quoted"),
    ("one two three four five", 3, "one two three"),
    ("one, two,three", 2, "one two"),
  ],
)
def test_pre_caption(raw, max_words, expect):
  assert pre_caption(raw, max_words) == expect


@pytest.mark.parametrize("raw", ["", "   ", "?!.,;:", "\n\n", "- / -", "\t"])
def test_pre_caption_empty_raises_with_record_and_field(raw):
  with pytest.raises(SkipRecord) as e:
    pre_caption(raw, 30, record_id="rec-7", field="captions[2]")
  assert e.value.reason == "empty_caption"
  assert "rec-7" in str(e.value) and "captions[2]" in str(e.value)


def test_pre_caption_wrong_type():
  with pytest.raises(SkipRecord) as e:
    pre_caption(["a list"], 30, record_id="r", field="captions[0]")
  assert e.value.reason == "bad_field_type"


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(assets.minilm_dir(), max_tokens=8)


def test_padding_layout(tok):
  t = tok("a dog")
  assert t.ids.dtype == np.int32 and t.mask.dtype == np.int32 and t.ids.shape == (8,)
  assert t.ids.tolist() == [101, 1037, 3899, 102, 0, 0, 0, 0]
  assert t.mask.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
  assert t.pieces == ("[CLS]", "a", "dog", "[SEP]") and t.length == 4
  assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.vocab_size) == (
    101,
    102,
    0,
    103,
    30522,
  )


def test_truncation_keeps_first_pieces(tok):
  t = tok("a snowboarder jumping over unbelievably gigantic xylophones")
  assert t.pieces == ("[CLS]", "a", "snow", "##board", "##er", "jumping", "over", "[SEP]")
  assert t.ids[-1] == 102 and t.mask.sum() == 8


def test_matches_hugging_face_layout(tok):
  from transformers import AutoTokenizer

  hf = AutoTokenizer.from_pretrained(str(assets.minilm_dir()))
  for cap in [
    "a dog",
    "a snowboarder jumping over unbelievably gigantic xylophones",
    "two zebras",
    "x",
  ]:
    ref = hf(cap, max_length=8, truncation=True, padding="max_length")
    assert tok(cap).ids.tolist() == ref["input_ids"], cap
    assert tok(cap).mask.tolist() == ref["attention_mask"], cap


def test_no_tokens_raises(tok):
  with pytest.raises(SkipRecord) as e:
    tok("   ", record_id="r1", field="captions[0]")
  assert e.value.reason == "caption_no_tokens" and "r1" in str(e.value)


def test_tokenizer_pickles_and_validates(tok):
  t2 = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(t2("two zebras").ids, tok("two zebras").ids)
  with pytest.raises(ValueError, match="max_tokens"):
    Tokenizer(assets.minilm_dir(), max_tokens=2)
