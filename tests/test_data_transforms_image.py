"""Image ops, box movement, region crops, patch masks and RandAugment.

The official rules: docs/fidelity.md#region-crop and the entries after it.
"""

from __future__ import annotations

import json
import math
import time

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from data_pipelines import image_ops as io
from data_pipelines import randaugment as ra


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A natural-ish uint8 [H, W, 3] image (blurred noise plus gradients)."""
  rng = np.random.default_rng(seed)
  img = rng.random((h, w, 3)) * 160 + 40
  img += np.linspace(0, 50, w)[None, :, None]
  return cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (5, 5), 0)


# ------------------------------------------------------------------------------- box ops


def test_crop_flip_resize_boxes_by_hand():
  crop = io.Crop(10, 20, 110, 220)
  np.testing.assert_allclose(crop.boxes([[0, 0, 50, 50]]), [[0, 0, 40, 30]])  # cut at top-left
  np.testing.assert_allclose(crop.boxes([[30, 40, 10, 5]]), [[20, 20, 10, 5]])  # inside: shift
  np.testing.assert_allclose(crop.boxes([[100, 210, 50, 50]]), [[90, 190, 10, 10]])  # bottom-right
  np.testing.assert_allclose(crop.boxes([[0, 0, 10, 300]])[0, 2], 0.0)  # touches the edge only
  np.testing.assert_allclose(io.HFlip(100).boxes([[10, 5, 20, 30]]), [[70, 5, 20, 30]])
  np.testing.assert_allclose(
    io.Resize(100, 200, 224, 224).boxes([[10, 20, 30, 40]]), [[22.4, 22.4, 67.2, 44.8]]
  )


def test_pixel_methods_match_box_methods():
  """A one-pixel-wide white bar moves exactly like its box under crop and flip."""
  img = np.zeros((40, 60, 3), np.uint8)
  img[10:20, 15:17] = 255  # box (15, 10, 2, 10)
  box = np.array([[15, 10, 2, 10]], float)
  crop, flip = io.Crop(5, 2, 45, 32), io.HFlip(40)
  pix = flip.pixels(crop.pixels(img))
  b = flip.boxes(crop.boxes(box))[0]
  ys, xs = np.nonzero(pix[..., 0])
  assert (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == tuple(b)


def test_crop_boxes_min_perc_is_strict_and_edges():
  crop = io.Crop(10, 0, 100, 100)
  boxes = [
    [0, 0, 20, 10],  # exactly half inside
    [0, 0, 19, 10],  # less than half
    [10, 0, 5, 5],  # starts exactly on the crop's left edge: fully inside
    [95, 95, 5, 5],  # ends exactly on the crop's bottom-right corner
    [0, 0, 10, 10],
  ]  # touches the left edge from outside: empty
  b, keep = io.crop_boxes(crop, boxes, 0.5)
  assert keep.tolist() == [False, False, True, True, False]
  np.testing.assert_allclose(b[2], [0, 0, 5, 5])
  np.testing.assert_allclose(b[3], [85, 95, 5, 5])
  _, keep = io.crop_boxes(crop, boxes, 0.49)
  assert keep.tolist() == [True, False, True, True, False]


def test_region_transform_full_image_crop_by_hand():
  """Anchor = whole image forces crop = image; check flip/no-flip boxes and pixels by hand."""
  img = _smooth_image(80, 100)
  boxes = np.array([[0, 0, 100, 80], [10, 10, 20, 20]], float)
  seen = set()
  for seed in range(20):
    view = io.region_transform(
      img,
      boxes,
      0,
      np.random.default_rng(seed),
      image_res=32,
      min_perc_in_image=0.5,
      randaugment=False,
    )
    assert view.keep.tolist() == [True, True]
    x = 70 if view.flipped else 10  # x := W - x - w
    np.testing.assert_allclose(view.boxes[1], [x * 0.32, 4.0, 6.4, 8.0])
    np.testing.assert_allclose(
      io.box_target(view.boxes[1], 32), [0.8 if view.flipped else 0.2, 0.25, 0.2, 0.25], rtol=1e-6
    )
    src = img[:, ::-1] if view.flipped else img
    expect = np.asarray(Image.fromarray(np.ascontiguousarray(src)).resize((32, 32), Image.BICUBIC))
    np.testing.assert_array_equal(view.pixels, expect)
    seen.add(view.flipped)
  assert seen == {True, False}


def test_region_crop_contains_anchor_and_boxes_normalised():
  img = _smooth_image(90, 130)
  rng = np.random.default_rng(0)
  for _ in range(200):
    x, y = int(rng.integers(0, 100)), int(rng.integers(0, 60))
    w, h = int(rng.integers(1, 130 - x + 1)), int(rng.integers(1, 90 - y + 1))
    crop = io.sample_region_crop((x, y, w, h), 130, 90, rng)
    assert 0 <= crop.x0 <= x and 0 <= crop.y0 <= y
    assert x + w <= crop.x1 <= 130 and y + h <= crop.y1 <= 90
    others = np.array([[x, y, w, h], [0, 0, 130, 90], [5, 5, 40, 40], [100, 60, 30, 30]], float)
    view = io.region_transform(img, others, 0, rng, image_res=48, min_perc_in_image=0.5)
    assert view.keep[0]  # the anchor is always fully inside its crop
    assert view.pixels.shape == (48, 48, 3) and view.pixels.dtype == np.uint8
    for b in view.boxes[view.keep]:
      t = io.box_target(b, 48)
      assert t.dtype == np.float32 and np.all((t >= 0) & (t <= 1)) and np.all(t[2:] > 0)
      assert b[0] >= -1e-9 and b[1] >= -1e-9 and b[0] + b[2] <= 48 + 1e-9


def test_region_eval_is_deterministic_resize():
  img = _smooth_image(50, 70)
  boxes = np.array([[7, 5, 21, 10]], float)
  view = io.region_transform(
    img, boxes, 0, np.random.default_rng(0), image_res=32, min_perc_in_image=0.5, train=False
  )
  np.testing.assert_array_equal(view.pixels, io.eval_transform(img, 32))
  np.testing.assert_allclose(view.boxes[0], [7 * 32 / 70, 5 * 32 / 50, 21 * 32 / 70, 10 * 32 / 50])


def test_box_target_clipped():
  np.testing.assert_allclose(io.box_target([-4, 0, 40, 10], 32), [0.5, 5 / 32, 1.0, 10 / 32])


# ----------------------------------------------------------------------------- patch mask


def _reference_patch_mask(x, y, w, h, res, ps):
  """The official rule (docs/fidelity.md#patch-mask-of-a-box) written out literally (with token
  0), then token 0 removed."""
  p = res // ps
  x_min = min(math.floor(x / ps), p - 1)
  x_max = max(x_min + 1, min(math.ceil((x + w) / ps), p))
  y_min = min(math.floor(y / ps), p - 1)
  y_max = max(y_min + 1, min(math.ceil((y + h) / ps), p))
  atts = [0] * (1 + p * p)
  atts[0] = 1
  for j in range(x_min, x_max):
    for i in range(y_min, y_max):
      atts[p * i + j + 1] = 1
  return np.array(atts[1:], np.int32)


@pytest.mark.parametrize(
  "box,expect",
  [
    ((0, 0, 16, 16), [0]),  # exactly one patch
    ((15.9, 0, 0.2, 16), [0, 1]),  # straddles a patch border
    ((64, 64, 0, 0), [15]),  # degenerate box on the far corner: clamped to the last patch
    ((60, 10, 10, 40), [3, 7, 11, 15]),  # overflows the right edge: clamped to column 3
    ((16, 32, 32, 16), [9, 10]),  # row-major: row 2, columns 1-2
    ((0, 0, 64, 64), list(range(16))),
  ],
)
def test_patch_mask_hand_cases(box, expect):
  m = io.patch_mask(np.array(box, float), 64, 16)
  assert m.dtype == np.int32 and m.shape == (16,)
  assert np.flatnonzero(m).tolist() == expect
  np.testing.assert_array_equal(m, _reference_patch_mask(*box, 64, 16))


def test_patch_mask_matches_reference_rule_random():
  rng = np.random.default_rng(0)
  for _ in range(300):
    x, y = rng.uniform(0, 224, 2)
    w, h = rng.uniform(0, 224 - x), rng.uniform(0, 224 - y)
    np.testing.assert_array_equal(
      io.patch_mask(np.array([x, y, w, h]), 224, 16), _reference_patch_mask(x, y, w, h, 224, 16)
    )


# ------------------------------------------------------------------- RandomResizedCrop


def test_resized_crop_fallback_is_centre_crop():
  # A 10:1 image cannot fit any ratio-(3/4, 4/3) crop of ~full area: centre crop at ratio 4/3.
  crop = io.sample_resized_crop(100, 1000, (0.99, 1.0), np.random.default_rng(0))
  assert crop == io.Crop(433, 0, 566, 100)
  crop = io.sample_resized_crop(1000, 100, (0.99, 1.0), np.random.default_rng(0))
  assert crop == io.Crop(0, 433, 100, 566)  # tall: height = round(100 / (3/4)) = 133


def test_resized_crop_statistics():
  rng = np.random.default_rng(1)
  h, w = 300, 400
  fracs = []
  for _ in range(500):
    c = io.sample_resized_crop(h, w, (0.2, 1.0), rng)
    cw, ch = c.size
    assert 0 <= c.x0 and c.x1 <= w and 0 <= c.y0 and c.y1 <= h and cw > 0 and ch > 0
    fracs.append(cw * ch / (h * w))
    assert 3 / 4 - 0.02 < cw / ch < 4 / 3 + 0.02 or (cw, ch) == (w, h)
  fracs = np.array(fracs)
  assert fracs.min() > 0.18 and fracs.max() <= 1.0 and 0.45 < fracs.mean() < 0.65


def test_image_text_transform_shapes_and_eval():
  img = _smooth_image(120, 90)
  out = io.image_text_transform(img, np.random.default_rng(0), 64, (0.2, 1.0))
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
  a = io.image_text_transform(img, np.random.default_rng(5), 64, (0.2, 1.0))
  b = io.image_text_transform(img, np.random.default_rng(5), 64, (0.2, 1.0))
  np.testing.assert_array_equal(a, b)
  ev = io.eval_transform(img, 64)
  np.testing.assert_array_equal(
    ev, np.asarray(Image.fromarray(img).resize((64, 64), Image.BICUBIC))
  )


def test_image_text_transform_without_flips():
  """allow_flip=False: the same crop as with flips allowed (the coin is still drawn), never
  mirrored; with flips allowed some seeds mirror it."""
  img = _smooth_image(120, 90)
  mirrored = 0
  for seed in range(16):
    on = io.image_text_transform(img, np.random.default_rng(seed), 64, (0.2, 1.0), False)
    off = io.image_text_transform(
      img, np.random.default_rng(seed), 64, (0.2, 1.0), False, allow_flip=False
    )
    if not np.array_equal(on, off):
      np.testing.assert_array_equal(on, off[:, ::-1])
      mirrored += 1
  assert 0 < mirrored < 16


# --------------------------------------------------------------------------- RandAugment


@pytest.mark.parametrize("name", sorted(ra.OPS))
def test_ops_keep_uint8_shape(name):
  img = _smooth_image(37, 53)
  fn, arg = ra.OPS[name]
  out = fn(img, arg(7, np.random.default_rng(0)))
  assert out.shape == img.shape and out.dtype == np.uint8
  if name == "Identity":
    np.testing.assert_array_equal(out, img)
    assert out is img


def test_colour_ops_match_pil():
  img = _smooth_image(45, 61, seed=3)
  pil = Image.fromarray(img)
  np.testing.assert_array_equal(ra.autocontrast(img), np.asarray(ImageOps.autocontrast(pil)))
  np.testing.assert_array_equal(ra.equalize(img), np.asarray(ImageOps.equalize(pil)))
  sharp = np.asarray(ImageEnhance.Sharpness(pil).enhance(1.36)).astype(int)
  assert np.abs(ra.sharpness(img, 1.36).astype(int) - sharp).max() <= 1
  flat = np.full((8, 8, 3), 77, np.uint8)
  np.testing.assert_array_equal(ra.autocontrast(flat), flat)
  np.testing.assert_array_equal(ra.equalize(flat), flat)


def test_magnitudes_at_7():
  rng = np.random.default_rng(0)
  assert ra.OPS["Brightness"][1](7, rng) == pytest.approx(1.36)
  assert {abs(round(ra.OPS["ShearX"][1](7, rng), 6)) for _ in range(5)} == {0.21}
  assert {abs(round(ra.OPS["TranslateY"][1](7, rng), 6)) for _ in range(5)} == {7.0}
  signs = {np.sign(ra.OPS["Rotate"][1](7, rng)) for _ in range(50)}
  assert signs == {-1.0, 1.0} and abs(ra.OPS["Rotate"][1](7, rng)) == pytest.approx(21.0)
  img = np.array([[[0, 100, 200]]], np.uint8)
  np.testing.assert_array_equal(ra.brightness(img, 1.36), [[[0, 136, 255]]])  # multiply + clip


def test_translate_moves_content_with_grey_fill():
  img = _smooth_image(20, 30)
  out = ra.translate_x(img, 7.0)
  np.testing.assert_array_equal(out[:, :23], img[:, 7:])
  assert np.all(out[:, 23:] == 128)
  out = ra.translate_y(img, -7.0)
  np.testing.assert_array_equal(out[7:], img[:13])
  assert np.all(out[:7] == 128)


def test_randaugment_probability_and_lists():
  img = _smooth_image(32, 32)
  assert set(ra.COLOR_OPS) < set(ra.FULL_OPS) and len(ra.FULL_OPS) == 10
  with pytest.raises(ValueError, match="unknown"):
    ra.RandAugment(("Solarize",))
  # Only Identity in the list: always exact.
  np.testing.assert_array_equal(ra.RandAugment(("Identity",))(img, np.random.default_rng(0)), img)
  # Brightness only: unchanged with probability 0.5^2 = 0.25.
  aug = ra.RandAugment(("Brightness",))
  rng = np.random.default_rng(0)
  unchanged = np.mean([np.array_equal(aug(img, rng), img) for _ in range(3000)])
  assert 0.22 < unchanged < 0.28


# ---------------------------------------------------------------------------- throughput


def test_image_text_transform_throughput(capsys):
  """Prints augmented 224-px images per CPU-second (one core); no timing assertion."""
  cv2.setNumThreads(1)
  img = _smooth_image(480, 640)
  ok, jpeg = cv2.imencode(".jpg", img[..., ::-1])
  assert ok
  rng = np.random.default_rng(0)
  n = 60
  t0 = time.process_time()
  for _ in range(n):
    out = io.image_text_transform(img, rng, 224, (0.2, 1.0), randaugment=True)
  transform_s = (time.process_time() - t0) / n
  from data_pipelines.checks import decode_image

  t0 = time.process_time()
  for _ in range(n):
    out = io.image_text_transform(
      decode_image(jpeg.tobytes(), "bench", "image"), rng, 224, (0.2, 1.0), randaugment=True
    )
  decode_s = (time.process_time() - t0) / n
  assert out.shape == (224, 224, 3)
  with capsys.disabled():
    print(
      "\n"
      + json.dumps(
        {
          "bench": "image_text_transform_224",
          "source": "640x480",
          "images_per_cpu_s": round(1 / transform_s, 1),
          "images_per_cpu_s_with_jpeg_decode": round(1 / decode_s, 1),
        }
      )
    )
