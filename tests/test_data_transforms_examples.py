"""make_example end to end on synthetic and hand-made records.

The official rules: docs/fidelity.md#data-and-masking.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines import assets, examples, packing
from data_pipelines import features as F
from data_pipelines.image_ops import eval_transform
from data_pipelines.synthetic import SyntheticSource
from data_pipelines.text_ops import Tokenizer

CFG = F.PreprocConfig(image_res=32, max_tokens=16, max_masks=4, max_regions=3, frame_len=3)
SIZES = F.BatchSizes(
  image_res=32,
  max_tokens=16,
  max_masks=4,
  image_batch=2,
  region_batch=4,
  region_max_images=2,
  video_batch=2,
  frame_len=3,
)


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(assets.minilm_dir(), max_tokens=CFG.max_tokens)


def _png(h: int, w: int, seed: int = 0) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _region_record(**over):
  rec = {
    "kind": "region",
    "id": "reg-1",
    "image": _png(60, 80),
    "captions": ["a busy street"],
    "elems": [
      {"bb": [10, 5, 30, 20], "captions": ["dog"], "attributes": ["brown", "small"]},
      {"bb": [50.7, 30.2, 20.9, 25.5], "captions": ["red car", "car"], "attributes": []},
      {"bb": [0, 0, 80, 60], "captions": ["the whole scene"], "attributes": []},
      {"bb": [70, 50, 30, 30], "captions": ["outside box"], "attributes": []},
    ],
  }
  rec.update(over)
  return rec


def _same(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", F.KINDS)
def test_synthetic_records_match_example_spec(kind, tok):
  src = SyntheticSource(kind, 12)
  for i in range(len(src)):
    ex = examples.make_example(kind, src[i], np.random.default_rng([0, i]), CFG, tok)
    n = packing.check_example(kind, ex, SIZES, f"{kind}[{i}]", CFG.max_regions)
    if kind == F.REGION:
      assert 1 <= n <= CFG.max_regions
      assert np.all((ex[F.BOX] >= 0) & (ex[F.BOX] <= 1))
      assert np.all(ex[F.PATCH_MASK].sum(1) >= 1)
    if kind == F.VIDEO:
      assert ex[F.FRAME_VALID].tolist() == [1, 1, 1]
    ids, mask = ex[F.TEXT_IDS], ex[F.TEXT_MASK]
    assert np.all(ids[..., 0] == tok.cls_id) and np.all((ids != 0) == (mask == 1))


@pytest.mark.parametrize("kind", F.KINDS)
def test_reproducible_from_seed(kind, tok):
  rec = SyntheticSource(kind, 4)[3]
  a = examples.make_example(kind, rec, np.random.default_rng(11), CFG, tok)
  b = examples.make_example(kind, rec, np.random.default_rng(11), CFG, tok)
  assert _same(a, b)
  others = [examples.make_example(kind, rec, np.random.default_rng(s), CFG, tok) for s in range(4)]
  assert not all(_same(a, o) for o in others)


def test_image_eval_is_plain_resize(tok):
  rec = {"kind": "image", "id": "im", "image": _png(40, 50, 3), "captions": ["a cat"]}
  ex = examples.make_example(
    "image", rec, np.random.default_rng(0), dataclasses.replace(CFG, train=False), tok
  )
  img = np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB"))
  np.testing.assert_array_equal(ex[F.PIXELS], eval_transform(img, 32))
  assert ex[F.TEXT_IDS][:4].tolist() == [101, 1037, 4937, 102]


def test_region_text_order_and_content(tok):
  rec = _region_record()
  texts, ns = set(), set()
  for s in range(30):
    ex = examples.make_example("region", rec, np.random.default_rng(s), CFG, tok)
    n = packing.check_example("region", ex, SIZES, "reg-1", CFG.max_regions)
    ns.add(n)
    # Whole caption first, then elems kept by the crop (the anchor at least), <= max_regions.
    assert ex[F.IS_IMAGE].tolist() == [1] + [0] * (n - 1) and n >= 2
    np.testing.assert_array_equal(ex[F.BOX][0], [0.5, 0.5, 1, 1])
    assert ex[F.PATCH_MASK][0].sum() == 4  # all T = 4 patches at R = 32
    for row in ex[F.TEXT_IDS][1:]:
      texts.add(tok._backend.decode([int(i) for i in row if i not in (0, 101, 102)]))
  assert ns == {2, 3}  # elems cut by the crop are dropped; max_regions = 3 caps the rest
  # Attribute + caption; the box that leaves the image is never used.
  assert {"brown dog", "small dog", "red car", "car", "the whole scene"} <= texts
  assert not any("outside" in t for t in texts)


def test_region_eval_boxes_by_hand(tok):
  cfg = dataclasses.replace(CFG, train=False)
  rec = _region_record(
    captions=[], elems=[{"bb": [10, 5, 30, 20], "captions": ["dog"], "attributes": []}]
  )
  ex = examples.make_example("region", rec, np.random.default_rng(0), cfg, tok)
  # 80x60 image -> 32x32: x 10*0.4 = 4, w 12, y 5*32/60, h 20*32/60.
  x, w, y, h = 4.0, 12.0, 5 * 32 / 60, 20 * 32 / 60
  np.testing.assert_allclose(
    ex[F.BOX][0], [(x + w / 2) / 32, (y + h / 2) / 32, w / 32, h / 32], rtol=1e-6
  )
  # x in [4, 16] -> column 0 only (ceil(16/16) = 1); y in [2.7, 13.3] -> row 0.
  assert ex[F.PATCH_MASK][0].tolist() == [1, 0, 0, 0]
  assert ex[F.IS_IMAGE].tolist() == [0]


def test_careful_hflip(tok):
  rec = _region_record(
    captions=["a dog on the left"],
    elems=[{"bb": [0, 0, 20, 60], "captions": ["dog"], "attributes": []}],
  )
  careful = dataclasses.replace(CFG, careful_hflip=True, randaugment=False)
  plain = dataclasses.replace(CFG, randaugment=False)
  xs_careful, xs_plain = set(), set()
  for s in range(30):
    # The anchor box touches x = 0, so the crop's x0 is 0: unflipped boxes start at x = 0.
    for cfg, xs in ((careful, xs_careful), (plain, xs_plain)):
      ex = examples.make_example("region", rec, np.random.default_rng(s), cfg, tok)
      xs.add(bool(ex[F.BOX][1, 0] - ex[F.BOX][1, 2] / 2 < 1e-6))
  assert xs_careful == {True} and xs_plain == {True, False}


def test_video_frames_independent_and_eval(tok):
  rec = {
    "kind": "video",
    "id": "v",
    "clips": [[_png(40, 40, 5)]],
    "captions": ["a ball"],
    "is_continuous": False,
  }
  ex = examples.make_example("video", rec, np.random.default_rng(0), CFG, tok)
  f = ex[F.FRAMES]
  assert f.shape == (3, 32, 32, 3) and f.dtype == np.uint8
  # Frames are augmented independently (docs/fidelity.md#independent-frame-augmentation).
  assert not (np.array_equal(f[0], f[1]) and np.array_equal(f[1], f[2]))
  ev = examples.make_example(
    "video", rec, np.random.default_rng(0), dataclasses.replace(CFG, train=False), tok
  )
  assert np.array_equal(ev[F.FRAMES][0], ev[F.FRAMES][1]) and np.array_equal(
    ev[F.FRAMES][0], ev[F.FRAMES][2]
  )


@pytest.mark.parametrize(
  "kind,record,reason,field",
  [
    ("image", {"id": "a", "image": b"not an image", "captions": ["x"]}, "corrupt_image", "image"),
    ("image", {"id": "b", "image": _png(8, 8), "captions": ["?!"]}, "empty_caption", "captions[0]"),
    ("image", {"id": "c", "image": _png(8, 8), "captions": []}, "empty_caption", "captions"),
    ("image", {"id": "d", "captions": ["x"]}, "bad_field_type", "image"),
    ("image", {"id": "e", "image": _png(8, 8), "captions": "a str"}, "bad_field_type", "captions"),
    (
      "region",
      _region_record(
        id="f",
        elems=[
          {"bb": [70, 50, 30, 30], "captions": ["x"]},
          {"bb": [1, 1, 0, 5], "captions": ["y"]},
        ],
      ),
      "bad_box",
      "elems",
    ),
    (
      "region",
      _region_record(id="g", captions=[], elems=[{"bb": [1, 1, 5, 5], "captions": ["."]}]),
      "no_usable_elem",
      "elems",
    ),
    (
      "region",
      _region_record(id="h", elems=[{"bb": [1, 2, 3], "captions": ["x"]}]),
      "bad_field_type",
      "elems[0].bb",
    ),
    ("video", {"id": "i", "clips": [[]], "captions": ["x"]}, "empty_video", "clips"),
    ("video", {"id": "j", "clips": [[b"junk"]], "captions": ["x"]}, "corrupt_image", "clips[0][0]"),
  ],
)
def test_skip_reasons_name_record_and_field(kind, record, reason, field, tok):
  with pytest.raises(F.SkipRecord) as e:
    examples.make_example(kind, record, np.random.default_rng(0), CFG, tok)
  assert e.value.reason == reason
  assert e.value.record_id == record["id"] and e.value.field == field


def test_config_mismatch_and_unknown_kind(tok):
  with pytest.raises(ValueError, match="max_tokens"):
    examples.make_example(
      "image", {"id": "x"}, np.random.default_rng(0), dataclasses.replace(CFG, max_tokens=20), tok
    )
  with pytest.raises(ValueError, match="unknown kind"):
    examples.make_example("audio", {"id": "x"}, np.random.default_rng(0), CFG, tok)
