"""Image ops that move boxes with the pixels, and the per-kind image transforms.

Official transforms: docs/fidelity.md#image-transforms, docs/fidelity.md#region-crop.

Every geometric op is one object with two methods: `pixels(img)` on a uint8 [H, W, 3] array and
`boxes(b)` on float [N, 4] boxes in (x, y, w, h) pixel coordinates (top-left + size), so a box
always follows the pixels it describes. Random parameters are drawn by separate `sample_*`
functions from a numpy Generator, so an op is a plain deterministic value.

Resizing uses PIL's bicubic filter on purpose: that is what torchvision's RandomResizedCrop /
Resize do on PIL images in the official pipeline (antialiased when shrinking); cv2's INTER_CUBIC
would alias on large downscales. Outputs stay uint8 HWC; normalisation happens on device.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from data_pipelines.randaugment import COLOR_OPS, FULL_OPS, RandAugment

# torchvision RandomResizedCrop defaults kept by the official transforms.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

FULL_AUGMENT = RandAugment(FULL_OPS, n=2, magnitude=7)
COLOR_AUGMENT = RandAugment(COLOR_OPS, n=2, magnitude=7)


@dataclasses.dataclass(frozen=True)
class Crop:
  """Integer crop [x0, x1) x [y0, y1) of the source image."""

  x0: int
  y0: int
  x1: int
  y1: int

  @property
  def size(self) -> tuple[int, int]:
    """(width, height) of the crop."""
    return self.x1 - self.x0, self.y1 - self.y0

  def pixels(self, img: np.ndarray) -> np.ndarray:
    """[H, W, 3] -> [y1-y0, x1-x0, 3] (a view)."""
    return img[self.y0 : self.y1, self.x0 : self.x1]

  def boxes(self, b: np.ndarray) -> np.ndarray:
    """Intersects boxes [N, 4] (x, y, w, h) with the crop and shifts them to crop coordinates.

    A box that misses the crop gets w = 0 and/or h = 0 (callers decide what to keep).
    """
    b = np.asarray(b, np.float64).reshape(-1, 4)
    xx = np.maximum(b[:, 0], self.x0)
    yy = np.maximum(b[:, 1], self.y0)
    xm = np.minimum(b[:, 0] + b[:, 2], self.x1)
    ym = np.minimum(b[:, 1] + b[:, 3], self.y1)
    w = np.maximum(xm - xx, 0.0)
    h = np.maximum(ym - yy, 0.0)
    return np.stack([xx - self.x0, yy - self.y0, w, h], axis=1)


@dataclasses.dataclass(frozen=True)
class HFlip:
  """Horizontal flip of an image of the given width."""

  width: int

  def pixels(self, img: np.ndarray) -> np.ndarray:
    """Mirror left-right; [H, W, 3] -> [H, W, 3]."""
    if img.shape[1] != self.width:
      raise ValueError(f"HFlip built for width {self.width}, image has {img.shape[1]}")
    return img[:, ::-1]

  def boxes(self, b: np.ndarray) -> np.ndarray:
    """x := W - x - w."""
    b = np.array(b, np.float64).reshape(-1, 4)
    b[:, 0] = self.width - b[:, 0] - b[:, 2]
    return b


@dataclasses.dataclass(frozen=True)
class Resize:
  """Bicubic resize from (in_w, in_h) to (out_w, out_h); aspect ratio not preserved."""

  in_w: int
  in_h: int
  out_w: int
  out_h: int

  def pixels(self, img: np.ndarray) -> np.ndarray:
    """[in_h, in_w, 3] -> [out_h, out_w, 3] uint8, PIL bicubic (torchvision's behaviour)."""
    if img.shape[:2] != (self.in_h, self.in_w):
      raise ValueError(f"Resize built for {self.in_h}x{self.in_w}, image is {img.shape[:2]}")
    if (self.in_w, self.in_h) == (self.out_w, self.out_h):
      return np.ascontiguousarray(img)
    pil = Image.fromarray(np.ascontiguousarray(img))
    return np.asarray(pil.resize((self.out_w, self.out_h), Image.BICUBIC))

  def boxes(self, b: np.ndarray) -> np.ndarray:
    """Scales x, w by out_w/in_w and y, h by out_h/in_h."""
    b = np.array(b, np.float64).reshape(-1, 4)
    sx, sy = self.out_w / self.in_w, self.out_h / self.in_h
    return b * np.array([sx, sy, sx, sy])


def sample_resized_crop(
  h: int,
  w: int,
  scale: tuple[float, float],
  rng: np.random.Generator,
  ratio: tuple[float, float] = CROP_RATIO,
) -> Crop:
  """torchvision's RandomResizedCrop parameters (10 tries, then a centre-crop fallback).

  Each try draws an area fraction uniform in `scale` and a log-uniform aspect ratio; the crop is
  accepted if it fits, and placed uniformly. The fallback clamps the whole image to `ratio`.
  """
  area = h * w
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    cw = int(round(math.sqrt(target_area * aspect)))
    ch = int(round(math.sqrt(target_area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      i = int(rng.integers(0, h - ch + 1))
      j = int(rng.integers(0, w - cw + 1))
      return Crop(j, i, j + cw, i + ch)
  in_ratio = w / h
  if in_ratio < min(ratio):
    cw, ch = w, int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    ch, cw = h, int(round(h * max(ratio)))
  else:
    cw, ch = w, h
  i, j = (h - ch) // 2, (w - cw) // 2
  return Crop(j, i, j + cw, i + ch)


def sample_region_crop(
  box: tuple[int, int, int, int], width: int, height: int, rng: np.random.Generator
) -> Crop:
  """A random crop that contains `box` (x, y, w, h) (docs/fidelity.md#region-crop).

  x0 in [0, floor(x)], y0 in [0, floor(y)], x1 in [min(ceil(x+w), W), W], y1 likewise, all
  inclusive uniform integers.
  """
  x, y, w, h = box
  x0 = int(rng.integers(0, math.floor(x) + 1))
  y0 = int(rng.integers(0, math.floor(y) + 1))
  x1 = int(rng.integers(min(math.ceil(x + w), width), width + 1))
  y1 = int(rng.integers(min(math.ceil(y + h), height), height + 1))
  return Crop(x0, y0, x1, y1)


def image_text_transform(
  img: np.ndarray,
  rng: np.random.Generator,
  image_res: int,
  crop_scale: tuple[float, float],
  randaugment: bool = True,
  allow_flip: bool = True,
) -> np.ndarray:
  """Pre-training transform for images and video frames; uint8 [H, W, 3] -> [R, R, 3].

  RandomResizedCrop(R, crop_scale, (3/4, 4/3), bicubic) -> horizontal flip with p 0.5 (texts are
  never edited; none when allow_flip is False) -> RandAugment(2, 7, full op list), as
  docs/fidelity.md#image-transforms.
  """
  h, w = img.shape[:2]
  crop = sample_resized_crop(h, w, crop_scale, rng)
  cw, ch = crop.size
  out = Resize(cw, ch, image_res, image_res).pixels(crop.pixels(img))
  # The coin is drawn even when flips are off, so the later random choices stay the same.
  if rng.random() < 0.5 and allow_flip:
    out = HFlip(image_res).pixels(out)
  if randaugment:
    out = FULL_AUGMENT(np.ascontiguousarray(out), rng)
  return np.ascontiguousarray(out)


def eval_transform(img: np.ndarray, image_res: int) -> np.ndarray:
  """Evaluation transform: bicubic resize to R x R only; uint8 [H, W, 3] -> [R, R, 3]."""
  h, w = img.shape[:2]
  return Resize(w, h, image_res, image_res).pixels(img)


def crop_boxes(
  crop: Crop, boxes: np.ndarray, min_perc_in_image: float
) -> tuple[np.ndarray, np.ndarray]:
  """Visible part of each box in crop coordinates, and whether the box is kept.

  Kept iff the intersection is non-empty and its area / the original area > min_perc_in_image
  (strict, as the official code: a box exactly half inside at 0.5 is dropped).

  Returns: boxes float64 [N, 4] (x, y, w, h) in the crop, keep bool [N].
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  b = crop.boxes(boxes)
  area = boxes[:, 2] * boxes[:, 3]
  vis = b[:, 2] * b[:, 3]
  # The ratio is computed as a division, like the official code, so boundary cases round alike.
  ratio = np.divide(vis, area, out=np.zeros_like(vis), where=area > 0)
  keep = (b[:, 2] > 0) & (b[:, 3] > 0) & (ratio > min_perc_in_image)
  return b, keep


@dataclasses.dataclass(frozen=True)
class RegionView:
  """Result of `region_transform`.

  pixels: uint8 [R, R, 3]
  boxes:  float64 [N, 4] (x, y, w, h) in resized pixels, only meaningful where keep is True
  keep:   bool [N] box intersects the crop with visible area fraction > min_perc (strict)
  flipped: whether the horizontal flip was applied
  """

  pixels: np.ndarray
  boxes: np.ndarray
  keep: np.ndarray
  flipped: bool


def region_transform(
  img: np.ndarray,
  boxes: np.ndarray,
  anchor: int,
  rng: np.random.Generator,
  *,
  image_res: int,
  min_perc_in_image: float,
  train: bool = True,
  randaugment: bool = True,
  allow_flip: bool = True,
) -> RegionView:
  """Crop around box `anchor`, maybe flip, bicubic resize, colour RandAugment.

  Args:
    img: uint8 [H, W, 3].
    boxes: [N, 4] integer-valued (x, y, w, h) pixel boxes, all inside the image with w, h > 0.
    anchor: index of the box the crop must contain.
    train: False -> no crop, flip or augmentation (resize of the whole image only).
    allow_flip: False when `careful_hflip` found "left"/"right" in a text.
  """
  height, width = img.shape[:2]
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if train:
    crop = sample_region_crop(tuple(boxes[anchor]), width, height, rng)
  else:
    crop = Crop(0, 0, width, height)
  cw, ch = crop.size
  pix = crop.pixels(img)
  b, keep = crop_boxes(crop, boxes, min_perc_in_image)
  flipped = bool(train and rng.random() < 0.5 and allow_flip)
  if flipped:
    flip = HFlip(cw)
    pix, b = flip.pixels(pix), flip.boxes(b)
  resize = Resize(cw, ch, image_res, image_res)
  pix, b = resize.pixels(pix), resize.boxes(b)
  if train and randaugment:
    pix = COLOR_AUGMENT(np.ascontiguousarray(pix), rng)
  return RegionView(np.ascontiguousarray(pix), b, keep, flipped)


def box_target(box: np.ndarray, image_res: int) -> np.ndarray:
  """(x, y, w, h) in resized pixels -> normalised (cx, cy, w, h) float32 [4], clipped to [0, 1]."""
  x, y, w, h = (float(v) for v in box)
  t = np.array([x + w / 2, y + h / 2, w, h], np.float64) / image_res
  return np.clip(t, 0.0, 1.0).astype(np.float32)


def patch_mask(box: np.ndarray, image_res: int, patch_size: int) -> np.ndarray:
  """Patches covered by a box (x, y, w, h) in resized pixels: int32 [T], row-major, no token 0.

  Official `get_image_attns` rule (docs/fidelity.md#patch-mask-of-a-box): x_min =
  min(floor(x/ps), P-1), x_max = max(x_min+1, min(ceil((x+w)/ps), P)) exclusive, the same for y;
  at least one patch is set.
  """
  p = image_res // patch_size
  x, y, w, h = (float(v) for v in box)
  x_min = min(math.floor(x / patch_size), p - 1)
  x_max = max(x_min + 1, min(math.ceil((x + w) / patch_size), p))
  y_min = min(math.floor(y / patch_size), p - 1)
  y_max = max(y_min + 1, min(math.ceil((y + h) / patch_size), p))
  grid = np.zeros((p, p), np.int32)  # [row = y, col = x]
  grid[y_min:y_max, x_min:x_max] = 1
  return grid.reshape(-1)  # [T]
