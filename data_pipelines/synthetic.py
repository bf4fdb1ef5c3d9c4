"""The synthetic "shapes world": seeded, learnable image / region / video data with no files.

Each image holds 1–4 non-overlapping coloured shapes (circle, square, triangle, diamond; red,
green, blue, yellow, purple; small or large) on a plain or noisy grey background. Captions are
generated from the scene, so they really describe the pixels: colours, shapes, sizes, where a
lone shape sits, and the spatial relation between two shapes ("a large red circle to the left
of a small blue square"). Region records carry object elems (caption = shape name,
attributes = [colour, "size colour"], exact tight pixel box) and region elems (a relation phrase
for two neighbouring shapes, box = union of their boxes). Videos show one shape moving in a
straight line ("a red circle moves to the left"), sometimes split into two clips.

Everything is a pure function of (seed, kind, index); `HELDOUT_SEED` gives a disjoint split.
Records are canonical (`features.py`) with PNG (or JPEG) bytes; `write_jsonl` writes them in the
official JSON-lines form and `write_arrayrecord` as ArrayRecord, so tests exercise the
production readers; `SyntheticSource` is an in-memory grain data source.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from PIL import Image

from data_pipelines import features as F
from data_pipelines import jsonl_format

TRAIN_SEED, HELDOUT_SEED = 0, 1_000_003
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
  "red": (220, 30, 30),
  "green": (30, 170, 50),
  "blue": (30, 70, 230),
  "yellow": (240, 220, 30),
  "purple": (150, 40, 190),
}
SIZES = {"small": 0.16, "large": 0.30}  # shape extent as a fraction of the image side
BACKGROUND = 128  # grey, far from every shape colour
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_KIND_CODE = {F.IMAGE: 1, F.REGION: 2, F.VIDEO: 3}
_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Knobs of the shapes world (defaults: 64 px PNG images, 1–4 shapes, 3–8 video frames)."""

  image_size: int = 64
  min_shapes: int = 1
  max_shapes: int = 4
  noise_prob: float = 0.5  # fraction of images with a noisy (not plain) background
  noise_std: float = 8.0
  image_format: str = "png"  # or "jpeg"
  min_frames: int = 3
  max_frames: int = 8
  multi_clip_prob: float = 0.25  # videos split into two clips (official clip-list format)
  # Region records carry the scene's listing caption as their optional whole-image "caption"
  # (docs/data.md); False leaves it out, so every region text is a boxed phrase.
  region_caption: bool = True


@dataclasses.dataclass(frozen=True)
class Shape:
  """One drawn shape: its words and its exact tight pixel box [x, y, w, h] (top-left origin)."""

  shape: str
  colour: str
  size: str
  bb: tuple[int, int, int, int]

  @property
  def centre(self) -> tuple[float, float]:
    x, y, w, h = self.bb
    return x + w / 2, y + h / 2

  def phrase(self, with_size: bool = True) -> str:
    """'a large red circle' (or 'a red circle')."""
    return f"a {self.size + ' ' if with_size else ''}{self.colour} {self.shape}"


def shape_mask(shape: str, s: int) -> np.ndarray:
  """bool [s, s] mask of a shape filling an s x s box."""
  i, j = np.mgrid[0:s, 0:s].astype(np.float64)  # rows, cols
  c = (s - 1) / 2
  if shape == "square":
    return np.ones((s, s), bool)
  if shape == "circle":
    return (i - c) ** 2 + (j - c) ** 2 <= (s / 2) ** 2
  if shape == "triangle":  # apex at the top centre, base on the bottom row
    return np.abs(j - c) <= (i + 1) / s * (s / 2)
  if shape == "diamond":
    return np.abs(i - c) + np.abs(j - c) <= s / 2
  raise ValueError(f"unknown shape {shape!r}")


def relation(a: Shape, b: Shape) -> str:
  """Where `a` is relative to `b`, along the axis where their centres differ most."""
  (ax, ay), (bx, by) = a.centre, b.centre
  if abs(ax - bx) >= abs(ay - by):
    return "to the left of" if ax < bx else "to the right of"
  return "above" if ay < by else "below"


def where(s: Shape, image_size: int) -> str:
  """Coarse position of a shape: 'top left', 'bottom', 'centre', ..."""
  cx, cy = s.centre
  third = image_size / 3
  v = "top" if cy < third else "bottom" if cy >= 2 * third else ""
  h = "left" if cx < third else "right" if cx >= 2 * third else ""
  return f"{v} {h}".strip() or "centre"


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  if fmt == "png":
    Image.fromarray(pixels).save(buf, format="PNG")
  elif fmt == "jpeg":
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
  else:
    raise ValueError(f"image_format must be 'png' or 'jpeg', got {fmt!r}")
  return buf.getvalue()


class ShapesWorld:
  """Deterministic generator of shapes-world scenes and canonical records."""

  def __init__(self, cfg: WorldConfig = WorldConfig(), seed: int = TRAIN_SEED):
    if cfg.image_size < 32:
      raise ValueError(f"image_size must be >= 32, got {cfg.image_size}")
    self.cfg, self.seed = cfg, int(seed)

  def _rng(self, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, _KIND_CODE[kind], int(index)])

  def _place(self, rng, n: int, avoid=()) -> list[Shape]:
    """Up to n shapes with distinct (colour, shape) and 2-px gaps between boxes."""
    side, out, boxes = self.cfg.image_size, [], list(avoid)
    used = set()
    for _ in range(n):
      for _attempt in range(50):
        size = str(rng.choice(list(SIZES)))
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        if (colour, shape) in used:
          continue
        s = max(5, round(SIZES[size] * side))
        x, y = (int(v) for v in rng.integers(1, side - s, size=2))
        if any(
          x < bx + bw + 2 and bx < x + s + 2 and y < by + bh + 2 and by < y + s + 2
          for bx, by, bw, bh in boxes
        ):
          continue
        rows, cols = np.nonzero(shape_mask(shape, s))
        bb = (
          x + int(cols.min()),
          y + int(rows.min()),
          int(cols.max() - cols.min() + 1),
          int(rows.max() - rows.min() + 1),
        )
        out.append(Shape(shape, colour, size, bb))
        boxes.append((x, y, s, s))
        used.add((colour, shape))
        break
    return out

  def _background(self, rng) -> np.ndarray:
    side = self.cfg.image_size
    img = np.full((side, side, 3), BACKGROUND, np.float64)  # [S, S, 3]
    if rng.random() < self.cfg.noise_prob:
      img += rng.normal(0, self.cfg.noise_std, img.shape)
    return img

  def draw(self, shapes: list[Shape], background: np.ndarray) -> np.ndarray:
    """uint8 [S, S, 3] image of the shapes on a copy of `background`."""
    img = background.copy()
    for s in shapes:
      x, y, w, h = s.bb
      side = max(w, h)  # every mask is square before cropping to its tight box
      m = shape_mask(s.shape, side)
      rows, cols = np.nonzero(m)
      m = m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]  # [h, w]
      img[y : y + h, x : x + w][m] = COLOURS[s.colour]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)

  def scene(self, index: int, kind: str = F.IMAGE) -> tuple[np.ndarray, list[Shape]]:
    """(uint8 [S, S, 3] pixels, shapes) of still image `index` (image and region kinds)."""
    rng = self._rng(kind, index)
    n = int(rng.integers(self.cfg.min_shapes, self.cfg.max_shapes + 1))
    background = self._background(rng)
    shapes = self._place(rng, n)
    return self.draw(shapes, background), shapes

  def captions(self, shapes: list[Shape], rng) -> list[str]:
    """Two true captions of a scene: a listing and a relation (or position) sentence."""
    phrases = [s.phrase() for s in shapes]
    if len(shapes) == 1:
      listing = phrases[0]
      other = f"{shapes[0].phrase(with_size=False)} at the {where(shapes[0], self.cfg.image_size)}"
    else:
      listing = (
        f"{_COUNT_WORDS[len(shapes)]} shapes: " + ", ".join(phrases[:-1]) + f" and {phrases[-1]}"
      )
      i, j = rng.choice(len(shapes), size=2, replace=False)
      a, b = shapes[int(i)], shapes[int(j)]
      other = f"{a.phrase()} {relation(a, b)} {b.phrase()}"
    return [listing, other]

  def region_elems(self, shapes: list[Shape]) -> list[dict]:
    """Object elems for every shape, then up to two region elems for neighbouring pairs."""
    elems = [
      {
        "bb": [float(v) for v in s.bb],
        "captions": [s.shape],
        "attributes": [s.colour, f"{s.size} {s.colour}"],
      }
      for s in shapes
    ]
    pairs = []
    for i, a in enumerate(shapes):
      dists = [
        (np.hypot(a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]), j)
        for j, b in enumerate(shapes)
        if j != i
      ]
      if dists:
        pair = tuple(sorted((i, min(dists)[1])))
        if pair not in pairs:
          pairs.append(pair)
    for i, j in pairs[:2]:
      a, b = shapes[i], shapes[j]
      x0, y0 = min(a.bb[0], b.bb[0]), min(a.bb[1], b.bb[1])
      x1 = max(a.bb[0] + a.bb[2], b.bb[0] + b.bb[2])
      y1 = max(a.bb[1] + a.bb[3], b.bb[1] + b.bb[3])
      elems.append(
        {
          "bb": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
          "captions": [f"{a.phrase()} {relation(a, b)} {b.phrase()}"],
          "attributes": [],
        }
      )
    return elems

  def video(self, index: int) -> tuple[list[np.ndarray], Shape, list[str], list[int]]:
    """(frames uint8 [S, S, 3] each, the mover at frame 0, per-clip directions, clip lengths)."""
    cfg, rng = self.cfg, self._rng(F.VIDEO, index)
    n_frames = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
    multi = n_frames >= 6 and rng.random() < cfg.multi_clip_prob
    lengths = [n_frames // 2, n_frames - n_frames // 2] if multi else [n_frames]
    dirs = [str(rng.choice(list(DIRECTIONS))) for _ in lengths]
    side = cfg.image_size
    s = max(5, round(SIZES["small"] * side))
    step = max(1, (side - s - 2) // (2 * n_frames))  # whole path stays inside the image
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    # Start where every clip's motion fits: compute the path, then shift it inside the image.
    moves = [DIRECTIONS[d] for d, n in zip(dirs, lengths) for _ in range(n)]
    path = np.cumsum([(0, 0)] + [(dx * step, dy * step) for dx, dy in moves[1:]], axis=0)
    lo, hi = path.min(0), path.max(0)
    start = [int(rng.integers(1 - lo[k], side - s - hi[k])) for k in range(2)]
    background = self._background(rng)
    frames, first = [], None
    for dx, dy in path:
      mover = self._place_at(shape, colour, start[0] + int(dx), start[1] + int(dy), s)
      first = first or mover
      frames.append(self.draw([mover], background))
    return frames, first, dirs, lengths

  @staticmethod
  def _place_at(shape: str, colour: str, x: int, y: int, s: int) -> Shape:
    rows, cols = np.nonzero(shape_mask(shape, s))
    return Shape(
      shape,
      colour,
      "small",
      (
        x + int(cols.min()),
        y + int(rows.min()),
        int(cols.max() - cols.min() + 1),
        int(rows.max() - rows.min() + 1),
      ),
    )

  def record(self, kind: str, index: int, record_id: str | None = None) -> dict:
    """Canonical record `index` of `kind` (id defaults to 'shapes-<seed>-<kind>-<index>')."""
    rid = record_id or f"shapes-{self.seed}-{kind}-{index:06d}"
    fmt = self.cfg.image_format
    if kind == F.VIDEO:
      frames, mover, dirs, lengths = self.video(index)
      what = mover.phrase(with_size=False)
      caps = [f"{what} moves {'to the ' if d in ('left', 'right') else ''}{d}" for d in dirs]
      if len(lengths) == 1:
        caps = [caps[0], f"{mover.phrase()} moving {dirs[0]}"]
      encoded = [_encode(f, fmt) for f in frames]
      clips = [encoded[: lengths[0]], encoded[lengths[0] :]] if len(lengths) == 2 else [encoded]
      return {
        "kind": kind,
        "id": rid,
        "clips": clips,
        "captions": caps,
        "is_continuous": len(lengths) == 2,
      }
    pixels, shapes = self.scene(index, kind)
    rng = self._rng(kind, index + (1 << 40))  # caption choices, independent of the drawing
    record = {"kind": kind, "id": rid, "image": _encode(pixels, fmt)}
    caps = self.captions(shapes, rng)
    if kind == F.IMAGE:
      record["captions"] = caps
    elif kind == F.REGION:
      record["captions"] = [caps[0]] if self.cfg.region_caption else []
      record["elems"] = self.region_elems(shapes)
    else:
      raise ValueError(f"unknown kind {kind!r}")
    return record


class SyntheticSource:
  """In-memory grain `RandomAccessDataSource`: record i of `kind` from a `ShapesWorld`."""

  def __init__(self, kind: str, size: int, world: ShapesWorld | None = None):
    if kind not in F.KINDS:
      raise ValueError(f"unknown kind {kind!r}; expected one of {F.KINDS}")
    self.kind, self.size, self.world = kind, int(size), world or ShapesWorld()

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int) -> dict:
    if not -self.size <= i < self.size:
      raise IndexError(f"record {i} out of range for {self.size} records")
    return self.world.record(self.kind, int(i) % self.size)

  def __repr__(self) -> str:
    return f"SyntheticSource(kind={self.kind!r}, size={self.size}, seed={self.world.seed})"


def _image_files(record: dict, out_dir: str, ext: str) -> list[str]:
  """Writes a record's images under out_dir/images/ and returns their relative paths."""
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  items = (
    [("", record["image"])]
    if "image" in record
    else [
      (f"_c{ci}_f{fi}", fr) for ci, clip in enumerate(record["clips"]) for fi, fr in enumerate(clip)
    ]
  )
  paths = []
  for suffix, data in items:
    rel = os.path.join("images", f"{record['id']}{suffix}.{ext}")
    with open(os.path.join(out_dir, rel), "wb") as f:
      f.write(data)
    paths.append(rel)
  return paths


def write_jsonl(
  world: ShapesWorld,
  kind: str,
  n: int,
  out_dir: str | os.PathLike,
  n_files: int = 2,
  rpath: bool = False,
) -> list[str]:
  """Writes records 0..n-1 as official JSON lines in `n_files` part files plus `_SUCCESS`.

  Each line carries its "id". With `rpath` images go to `out_dir/images/` and lines hold
  relative paths (read with `JsonlFormat(is_image_rpath=True)`). Returns the part file paths.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  fmt = jsonl_format.default_format(kind)
  bounds = np.linspace(0, n, n_files + 1).round().astype(int)
  files = []
  for p in range(n_files):
    path = os.path.join(out_dir, f"part-{p:05d}.jsonl")
    with open(path, "w") as f:
      for i in range(bounds[p], bounds[p + 1]):
        record = world.record(kind, i)
        paths = _image_files(record, out_dir, world.cfg.image_format) if rpath else None
        f.write(jsonl_format.to_line(record, fmt, paths, extra={"id": record["id"]}) + "\n")
    files.append(path)
  open(os.path.join(out_dir, "_SUCCESS"), "w").close()  # the official readers skip it
  return files


def write_arrayrecord(world: ShapesWorld, kind: str, n: int, out_dir: str | os.PathLike) -> str:
  """Writes records 0..n-1 as an ArrayRecord dataset (via `arrayrecord.write`); returns its dir."""
  from data_pipelines import arrayrecord  # tfds import is slow; only when needed

  return arrayrecord.write((world.record(kind, i) for i in range(n)), kind, out_dir)
