"""A PNG of grounding results: a few images with the true box (green) and the predicted box (red).

Drawn with PIL only (no display, no matplotlib state). Each tile is one phrase: its original
image scaled up so small images stay readable, both boxes in pixels of the original image scaled
the same way, and the phrase with the IoU underneath.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from x2vlm_jax import box_ops, paths
from x2vlm_jax.evaluators import grounding

TRUE_COLOUR = (0, 200, 0)
PRED_COLOUR = (230, 0, 0)
_TILE = 256  # pixels of the longer image side in a tile
_CAPTION_H = 40


def _pick(image_index: np.ndarray, n: int) -> list[int]:
  """Indices of up to n phrases, at most one per image, spread over the whole set."""
  first = {}
  for p, i in enumerate(image_index.tolist()):
    first.setdefault(i, p)
  rows = list(first.values())
  if len(rows) <= n:
    return rows
  return [rows[int(round(j))] for j in np.linspace(0, len(rows) - 1, n)]


def _wrap(text: str, width: int) -> list[str]:
  lines, line = [], ""
  for word in text.split():
    if line and len(line) + 1 + len(word) > width:
      lines.append(line)
      line = word
    else:
      line = f"{line} {word}".strip()
  return lines + [line] if line else lines


def grounding_tiles(data, pred_boxes: np.ndarray, n: int) -> Image.Image:
  """One RGB image: a row of up to n tiles (see the module docstring).

  data: an `eval_data.GroundingSet`; pred_boxes: [Np, 4] normalised (cx, cy, w, h).
  """
  rows = _pick(data.image_index, n)
  if not rows:
    raise ValueError("grounding_tiles: no phrase to draw")
  pred_px = grounding.pred_to_pixel_xywh(pred_boxes, data.image_wh)  # [Np, 4] (x, y, w, h)
  iou = np.asarray(box_ops.legacy_pixel_iou(pred_px, data.gt_boxes))  # [Np]
  font = ImageFont.load_default()
  canvas = Image.new("RGB", (len(rows) * (_TILE + 8) + 8, _TILE + _CAPTION_H + 16), "white")
  for t, p in enumerate(rows):
    img = data.originals[int(data.image_index[p])]
    h, w = img.shape[:2]
    scale = _TILE / max(h, w)
    tile = Image.fromarray(img).resize((round(w * scale), round(h * scale)), Image.NEAREST)
    draw = ImageDraw.Draw(tile)
    for (x, y, bw, bh), colour in ((data.gt_boxes[p], TRUE_COLOUR), (pred_px[p], PRED_COLOUR)):
      draw.rectangle(
        [x * scale, y * scale, (x + bw) * scale, (y + bh) * scale], outline=colour, width=3
      )
    x0 = 8 + t * (_TILE + 8)
    canvas.paste(tile, (x0, 8))
    text = f"{data.phrases[p]} (IoU {iou[p]:.2f})"
    ImageDraw.Draw(canvas).multiline_text(
      (x0, _TILE + 12), "\n".join(_wrap(text, 40)[:3]), fill="black", font=font
    )
  return canvas


def write_grounding_png(path: str, data, pred_boxes: np.ndarray, n: int = 6) -> str:
  """Writes `grounding_tiles` with a legend line to `path` (directories created); returns path."""
  tiles = grounding_tiles(data, pred_boxes, n)
  out = Image.new("RGB", (tiles.width, tiles.height + 20), "white")
  out.paste(tiles, (0, 20))
  draw = ImageDraw.Draw(out)
  draw.text((8, 4), "green = true box", fill=TRUE_COLOUR, font=ImageFont.load_default())
  draw.text((140, 4), "red = predicted box", fill=PRED_COLOUR, font=ImageFont.load_default())
  target = paths.path(path)  # a cloud URL is written through its client, not as a local file
  target.parent.mkdir(parents=True, exist_ok=True)
  with target.open("wb") as f:
    out.save(f, format="PNG")
  return path
