"""MVPTR region vectors and the feature-TSV row: hand-computed box values, bit-exact round trip,
bad rows skipped with the record and field named."""

import base64

import numpy as np
import pytest

from data_pipelines import features as F
from data_pipelines import mvptr_regions as R


def test_box_values_and_vectors():
  got = R.box_values([[10, 20, 50, 80]], width=100, height=200)
  np.testing.assert_allclose(got, [[0.1, 0.1, 0.5, 0.4, 0.4, 0.3]], rtol=1e-6)
  v = R.region_vectors(np.ones((1, 5)), [[10, 20, 50, 80]], 100, 200)
  assert v.shape == (1, 11) and v.dtype == np.float32 and (v[0, :5] == 1).all()
  with pytest.raises(ValueError, match="do not match"):
    R.region_vectors(np.ones((2, 5)), [[0, 0, 1, 1]], 10, 10)


def test_feature_row_round_trip_and_padding():
  v = np.random.default_rng(0).standard_normal((3, 11)).astype(np.float32)
  line = R.encode_feature_row("coco_123", v)
  image_id, back = R.decode_feature_row(line + "\n", 11, "feat.tsv:1")
  assert image_id == "coco_123" and np.array_equal(back, v)
  padded, mask = R.pad_regions(back, 5)
  assert mask.tolist() == [1, 1, 1, 0, 0] and np.array_equal(padded[:3], v) and not padded[3:].any()
  cut, mask = R.pad_regions(back, 2)
  assert mask.tolist() == [1, 1] and np.array_equal(cut, v[:2])


@pytest.mark.parametrize(
  "line, reason, field",
  [
    ("img\t3", "bad_field_type", "num_boxes"),
    ("img\tthree\tAAAA", "bad_field_type", "num_boxes"),
    ("img\t1\t%%%", "corrupt_image", "features"),
    (
      "img\t2\t" + base64.b64encode(np.zeros(11, np.float32).tobytes()).decode(),
      "corrupt_image",
      "features",
    ),
  ],
)
def test_bad_rows_are_skipped_by_name(line, reason, field):
  with pytest.raises(F.SkipRecord) as err:
    R.decode_feature_row(line, 11, "feat.tsv:7")
  assert (err.value.reason, err.value.field, err.value.record_id) == (reason, field, "feat.tsv:7")
