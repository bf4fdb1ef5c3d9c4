"""One MVPTR example: stream layout, phrase slots, masking labels, padding and cuts."""

import numpy as np
import pytest

from data_pipelines.mvptr_examples import MvptrExampleSpec, build_example

S = MvptrExampleSpec(max_tokens=8, max_phrases=3, max_tags=6, max_regions=4, region_dim=7)


def test_layout_without_masking():
  spec = MvptrExampleSpec(**{**S.__dict__, "word_rate": 0.0, "tag_rate": 0.0, "phrase_rate": 0.0})
  regions = np.ones((2, 7), np.float32)
  ex = build_example(
    np.random.default_rng(0), [2000, 2001, 2002], [40000, 50000], [3000, 3001], regions, spec
  )
  assert ex["text_ids"].tolist() == [101, 2000, 2001, 2002, 40000, 50000, 102, 0, 0, 0, 0]
  assert ex["text_mask"].tolist() == [1] * 7 + [0] * 4
  assert ex["phrase_positions"].tolist() == [4, 5, 0] and ex["phrase_valid"].tolist() == [1, 1, 0]
  assert ex["tag_ids"].tolist() == [101, 3000, 3001, 102, 0, 0]
  assert ex["region_mask"].tolist() == [1, 1, 0, 0] and ex["regions"].shape == (4, 7)
  assert (ex["text_labels"] == -1).all() and (ex["tag_labels"] == -1).all()
  assert (ex["phrase_labels"] == -1).all()


def test_masking_labels_and_cuts():
  spec = MvptrExampleSpec(**{**S.__dict__, "word_rate": 1.0, "tag_rate": 1.0, "phrase_rate": 1.0})
  words, tags = list(range(2000, 2010)), list(range(3000, 3010))  # both longer than allowed
  ex = build_example(
    np.random.default_rng(1), words, [40000, 40001, 40002, 40003], tags, np.zeros((6, 7)), spec
  )
  assert ex["text_labels"][1:7].tolist() == words[:6]  # max_tokens - 2 words, all chosen
  assert ex["text_labels"][0] == -1 and (ex["text_labels"][7:] == -1).all()
  assert ex["phrase_labels"].tolist() == [40000, 40001, 40002]  # cut to max_phrases
  assert ex["tag_labels"].tolist() == [-1, 3000, 3001, 3002, 3003, -1]
  assert (ex["text_ids"][1:7] == 103).mean() > 0.3  # mostly [MASK]
  assert ex["region_mask"].tolist() == [1, 1, 1, 1]
  with pytest.raises(ValueError, match="phrase ids"):
    build_example(np.random.default_rng(0), [2000], [90000], [], np.zeros((1, 7)), spec)
  with pytest.raises(ValueError, match="expected 7"):
    build_example(np.random.default_rng(0), [2000], [], [], np.zeros((1, 5)), spec)
