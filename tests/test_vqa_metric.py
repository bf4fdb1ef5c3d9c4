"""The official VQA accuracy and answer normalisation on hand-made cases
(x2vlm_jax/evaluators/vqa_metric.py, docs/finetuning.md#vqa-accuracy)."""

import pytest

from x2vlm_jax.evaluators import vqa_metric as V


@pytest.mark.parametrize(
  "raw,want",
  [
    ("Two", "2"),  # number words -> digits
    ("none", "0"),
    ("ten apples", "10 apples"),
    ("the red one", "red 1"),  # articles dropped
    ("a cat and an owl", "cat and owl"),
    ("Yes.", "yes"),  # a period not followed by a digit goes
    ("3.5", "3.5"),  # a decimal point stays
    ("1,000", "1000"),  # a digit,digit comma: every listed mark is deleted
    ("red, white", "red white"),
    ("black/white", "black white"),  # '/' not touching a space -> space
    ("t - shirt", "t shirt"),  # '-' touching a space is deleted
    ("dont", "don't"),  # contractions get their apostrophe back
    ("youd've", "you'd've"),
    ("its", "its"),  # a real word is no contraction
    ("  big\tdog\n", "big dog"),
  ],
)
def test_prediction_normalisation(raw, want):
  assert V.normalize_prediction(raw) == want


def test_soft_score_leave_one_out():
  ten = lambda a, n, b: [a] * n + [b] * (10 - n)
  assert V.vqa_accuracy("red", ["red"] * 10) == 1.0
  assert V.vqa_accuracy("red", ten("red", 3, "blue")) == pytest.approx(0.9)  # 7 x 1 + 3 x 2/3
  assert V.vqa_accuracy("red", ten("red", 2, "blue")) == pytest.approx(0.6)  # 8 x 2/3 + 2 x 1/3
  assert V.vqa_accuracy("red", ten("red", 1, "blue")) == pytest.approx(0.3)
  assert V.vqa_accuracy("red", ten("red", 4, "blue")) == 1.0
  assert V.vqa_accuracy("green", ten("red", 5, "blue")) == 0.0
  # The prediction is normalised, the annotators' answers only for punctuation (and only when
  # they disagree): "two" matches "2", and "yes!" matches "yes".
  assert V.vqa_accuracy("two", ["2"] * 10) == 1.0
  assert V.vqa_accuracy("The Yes!", ten("yes", 9, "no")) == 1.0
  assert V.vqa_accuracy("2", ten("two", 9, "2")) == pytest.approx(0.3)  # "two" stays "two"
  assert V.vqa_accuracy("t shirt", ten("t-shirt", 5, "shirt")) == pytest.approx(1.0)


def test_evaluate_with_majority_baseline():
  answers = [["yes"] * 10, ["yes"] * 10, ["no"] * 10, ["2"] * 10]
  m = V.evaluate_vqa(["yes", "no", "no", "two"], answers, prefix="eval/vqa/val")
  assert m["eval/vqa/val/acc"] == pytest.approx(75.0)
  assert m["eval/vqa/val/acc_majority"] == pytest.approx(50.0)
  with pytest.raises(ValueError, match="predictions"):
    V.evaluate_vqa(["yes"], answers)
