"""MVPTR fine-tuning rows (data_pipelines/mvptr_finetune_examples.py): unmasked streams and the
per-task targets, with errors that name the record."""

import numpy as np
import pytest

from data_pipelines import mvptr_finetune_examples as X
from data_pipelines import mvptr_regions
from data_pipelines.mvptr_examples import MvptrExampleSpec

SPEC = MvptrExampleSpec(max_tokens=8, max_phrases=2, max_tags=5, max_regions=4, region_dim=10)


def test_pair_fields_are_the_unmasked_streams():
  words, phrases, tags = [1000, 1001, 1002], [40000], [2000, 2001]
  regions = np.arange(30, dtype=np.float32).reshape(3, 10)
  row = X.pair_fields(words, phrases, tags, regions, SPEC)
  assert sorted(row) == sorted(X.STREAMS)
  np.testing.assert_array_equal(row["text_ids"], [101, 1000, 1001, 1002, 40000, 102, 0, 0, 0, 0])
  np.testing.assert_array_equal(row["text_mask"], [1] * 6 + [0] * 4)
  np.testing.assert_array_equal(row["tag_ids"], [101, 2000, 2001, 102, 0])
  np.testing.assert_array_equal(row["region_mask"], [1, 1, 1, 0])
  np.testing.assert_array_equal(row["regions"][:3], regions)


def test_vqa_scores_and_ve_labels():
  np.testing.assert_array_equal(
    X.vqa_scores([4, 1], [0.3, 1.0], 6), np.array([0, 1.0, 0, 0, 0.3, 0], np.float32)
  )
  with pytest.raises(ValueError, match="record q7: answer label 6 outside"):
    X.vqa_scores([6], [1.0], 6, record="q7")
  with pytest.raises(ValueError, match="2 answer labels but 1 scores"):
    X.vqa_scores([1, 2], [1.0], 6)
  assert [X.ve_label(n) for n in ("contradiction", "neutral", "entailment")] == [0, 1, 2]
  with pytest.raises(ValueError, match="record p3: gold_label 'maybe'"):
    X.ve_label("maybe", record="p3")


def test_grounding_fields_pad_boxes_and_mark_the_phrase_slots():
  boxes = [[0, 0, 1, 1], [1, 1, 3, 3], [0, 0, 2, 2], [4, 4, 5, 5], [6, 6, 7, 7]]
  out = X.grounding_fields(boxes, [0, 0, 2, 2], (1, 3), num_words=4, spec=SPEC)
  np.testing.assert_array_equal(out["region_boxes"], np.asarray(boxes[:4], np.float32))
  np.testing.assert_array_equal(out["phrase_mask"], [0, 0, 1, 1, 0, 0, 0, 0, 0, 0])
  short = X.grounding_fields(boxes[:2], [0, 0, 2, 2], (0, 1), num_words=1, spec=SPEC)
  np.testing.assert_array_equal(short["region_boxes"][2:], 0)
  with pytest.raises(ValueError, match=r"record r1: phrase span \(4, 8\) outside the 6 kept"):
    X.grounding_fields(boxes, [0, 0, 1, 1], (4, 8), num_words=9, spec=SPEC, record="r1")
  with pytest.raises(ValueError, match="gt_box must hold 4"):
    X.grounding_fields(boxes, [0, 0, 1], (0, 1), num_words=2, spec=SPEC)


def test_region_boxes_read_back_from_region_vectors():
  boxes = np.array([[10, 20, 30, 60], [0, 0, 100, 50]], np.float32)
  vec = mvptr_regions.region_vectors(np.ones((2, 4)), boxes, width=100, height=200)
  np.testing.assert_allclose(X.region_boxes(vec), boxes / [100, 200, 100, 200], rtol=1e-6)


def test_grounding_rows_one_per_grounded_phrase():
  regions = np.zeros((2, 3, 10), np.float32)
  regions[..., -6:-2] = np.arange(24).reshape(2, 3, 4)  # distinct boxes
  rows = {
    "text_ids": np.arange(20).reshape(2, 10), "text_mask": np.ones((2, 10), np.int32),
    "tag_ids": np.ones((2, 5)), "tag_mask": np.ones((2, 5)), "regions": regions,
    "region_mask": np.array([[1, 1, 1], [1, 1, 0]]), "phrase_positions": np.array([[4, 5], [6, 0]]),
    "phrase_valid": np.array([[1, 1], [1, 0]]),
  }  # fmt: skip
  out = X.grounding_rows(rows, np.array([[2, -1], [1, 0]]))  # row 1 slot 1 is not a phrase
  np.testing.assert_array_equal(out["text_ids"], rows["text_ids"][[0, 1]])
  np.testing.assert_array_equal(out["gt_box"], [regions[0, 2, -6:-2], regions[1, 1, -6:-2]])
  np.testing.assert_array_equal(out["region_boxes"][1], regions[1, :, -6:-2])
  np.testing.assert_array_equal(np.nonzero(out["phrase_mask"])[1], [4, 6])
  with pytest.raises(ValueError, match="row 1 phrase 0: target region 2 is padding"):
    X.grounding_rows(rows, np.array([[2, -1], [2, -1]]))
