"""RandAugment on uint8 HWC RGB arrays with cv2/numpy (docs/fidelity.md#randaugment).

The official variant: draw N ops uniformly *with replacement* from a list, then apply each with
probability 0.5 at magnitude M (of 10). At M = 7: Brightness/Sharpness factor 0.7*1.8+0.1 =
1.36 (brightness multiplies and clips, so it always brightens), shear ±0.3*0.7 = ±0.21, translate
±0.7*10 = ±7 pixels, rotate ±0.7*30 = ±21 degrees; the sign of geometric ops is random and their
fill colour is (128, 128, 128). AutoContrast and Equalize reproduce PIL's ImageOps (cutoff 0).
Geometric ops move pixels only: they are used for image-text pairs and video frames, never where
boxes must follow (region crops use the colour-only list).
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

MAX_LEVEL = 10.0
FILL = (128, 128, 128)

Op = Callable[[np.ndarray, float], np.ndarray]


def identity(img: np.ndarray, _: float = 0.0) -> np.ndarray:
  """Returns the image unchanged."""
  return img


def _lut(img: np.ndarray, tables: np.ndarray) -> np.ndarray:
  """Applies per-channel uint8 lookup tables [256, C] to a uint8 [H, W, C] image (cv2.LUT)."""
  return cv2.LUT(np.ascontiguousarray(img), np.ascontiguousarray(tables.reshape(1, 256, -1)))


def _channel_hist(img: np.ndarray, c: int) -> np.ndarray:
  """Histogram of channel c of a uint8 image: float [256]."""
  return cv2.calcHist([np.ascontiguousarray(img)], [c], None, [256], [0, 256]).reshape(-1)


def autocontrast(img: np.ndarray, _: float = 0.0) -> np.ndarray:
  """Per channel, stretches [min, max] to [0, 255] (PIL `ImageOps.autocontrast`, cutoff 0).

  lut[i] = int(i * 255/(hi-lo) - lo * 255/(hi-lo)) clipped to [0, 255]; a flat channel
  (hi <= lo) is left unchanged, as in PIL.
  """
  x = np.arange(256, dtype=np.float64)
  tables = np.empty((256, img.shape[2]), np.uint8)
  for c, ch in enumerate(cv2.split(np.ascontiguousarray(img))):
    lo, hi = cv2.minMaxLoc(ch)[:2]
    if hi <= lo:
      tables[:, c] = x
      continue
    scale = 255.0 / (hi - lo)
    tables[:, c] = np.clip(x * scale - lo * scale, 0, 255)
  return _lut(img, tables)


def equalize(img: np.ndarray, _: float = 0.0) -> np.ndarray:
  """Per-channel histogram equalisation with PIL's lookup table (`ImageOps.equalize`).

  step = (pixels - count of the last non-empty bin) // 255; lut[i] = (step//2 + cdf[i-1]) //
  step; a channel with step 0 (one grey level) is left unchanged.
  """
  tables = np.empty((256, img.shape[2]), np.uint8)
  for c in range(img.shape[2]):
    hist = _channel_hist(img, c).astype(np.int64)  # [256]
    nz = hist[hist != 0]
    step = int(nz[:-1].sum()) // 255
    if step == 0:
      tables[:, c] = np.arange(256)
      continue
    cdf_prev = np.concatenate([[0], np.cumsum(hist[:-1])])  # sum of bins below i
    tables[:, c] = np.clip((step // 2 + cdf_prev) // step, 0, 255)
  return _lut(img, tables)


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
  """Multiplies pixel values by `factor` and clips (the official op; factor 1.36 brightens)."""
  table = np.clip(np.arange(256, dtype=np.float64) * factor, 0, 255).astype(np.uint8)
  return cv2.LUT(img, table)


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
  """Blends with PIL's SMOOTH-filtered image; border pixels keep their values (as PIL).

  out = smooth + factor * (img - smooth) in the interior, clipped to [0, 255] (PIL clips; the
  official cv2 port wraps around on overflow, which we treat as a bug).
  """
  if factor == 1.0:
    return img
  kernel = np.ones((3, 3), np.float32)
  kernel[1, 1] = 5.0
  kernel /= 13.0
  smooth = cv2.filter2D(img, -1, kernel)  # uint8, rounded and saturated by cv2
  out = img.copy()
  inner = img[1:-1, 1:-1].astype(np.float32)
  blur = smooth[1:-1, 1:-1].astype(np.float32)
  out[1:-1, 1:-1] = np.clip(blur + factor * (inner - blur), 0, 255).astype(np.uint8)
  return out


def _warp(img: np.ndarray, m: np.ndarray) -> np.ndarray:
  h, w = img.shape[:2]
  return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=FILL)


def shear_x(img: np.ndarray, factor: float) -> np.ndarray:
  """x' = x + factor * y about the top-left corner (official cv2 matrix)."""
  return _warp(img, np.float32([[1, factor, 0], [0, 1, 0]]))


def shear_y(img: np.ndarray, factor: float) -> np.ndarray:
  """y' = y + factor * x about the top-left corner."""
  return _warp(img, np.float32([[1, 0, 0], [factor, 1, 0]]))


def translate_x(img: np.ndarray, offset: float) -> np.ndarray:
  """Content moves by -offset pixels horizontally (official matrix [[1, 0, -offset], ...])."""
  return _warp(img, np.float32([[1, 0, -offset], [0, 1, 0]]))


def translate_y(img: np.ndarray, offset: float) -> np.ndarray:
  """Content moves by -offset pixels vertically."""
  return _warp(img, np.float32([[1, 0, 0], [0, 1, -offset]]))


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
  """Rotates by `degrees` (counter-clockwise) about the image centre (W/2, H/2)."""
  h, w = img.shape[:2]
  return _warp(img, cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0))


# name -> (function, argument for magnitude `level` given the rng: signs are drawn here).
def _enhance_arg(level: float, rng: np.random.Generator) -> float:
  del rng
  return level / MAX_LEVEL * 1.8 + 0.1


def _signed(scale: float) -> Callable[[float, np.random.Generator], float]:
  def arg(level: float, rng: np.random.Generator) -> float:
    v = level / MAX_LEVEL * scale
    return -v if rng.random() < 0.5 else v

  return arg


def _no_arg(level: float, rng: np.random.Generator) -> float:
  del level, rng
  return 0.0


OPS: dict[str, tuple[Op, Callable[[float, np.random.Generator], float]]] = {
  "Identity": (identity, _no_arg),
  "AutoContrast": (autocontrast, _no_arg),
  "Equalize": (equalize, _no_arg),
  "Brightness": (brightness, _enhance_arg),
  "Sharpness": (sharpness, _enhance_arg),
  "ShearX": (shear_x, _signed(0.3)),
  "ShearY": (shear_y, _signed(0.3)),
  "TranslateX": (translate_x, _signed(10.0)),
  "TranslateY": (translate_y, _signed(10.0)),
  "Rotate": (rotate, _signed(30.0)),
}

# Image-text pairs and video frames (the official pre-training transform).
FULL_OPS = (
  "Identity",
  "AutoContrast",
  "Equalize",
  "Brightness",
  "Sharpness",
  "ShearX",
  "ShearY",
  "TranslateX",
  "TranslateY",
  "Rotate",
)
# Region crops: colour only, so boxes stay valid (the official box transform).
COLOR_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness")


class RandAugment:
  """N ops drawn uniformly with replacement from `ops`, each applied with probability `prob`."""

  def __init__(
    self, ops: tuple[str, ...] = FULL_OPS, n: int = 2, magnitude: float = 7.0, prob: float = 0.5
  ):
    unknown = [o for o in ops if o not in OPS]
    if unknown:
      raise ValueError(f"unknown RandAugment ops {unknown}; known: {sorted(OPS)}")
    self.ops, self.n, self.magnitude, self.prob = tuple(ops), n, magnitude, prob

  def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Augments a uint8 [H, W, 3] image; returns a uint8 [H, W, 3] image."""
    for k in rng.integers(0, len(self.ops), size=self.n):
      if rng.random() > self.prob:
        continue
      fn, arg = OPS[self.ops[k]]
      img = fn(img, arg(self.magnitude, rng))
    return img
