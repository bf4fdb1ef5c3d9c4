"""The shapes world: boxes match the pixels, captions describe them, everything is seeded."""

import re

import numpy as np
import pytest

from data_pipelines import checks, synthetic
from data_pipelines import features as F
from data_pipelines.synthetic import COLOURS, ShapesWorld, WorldConfig

_PHRASE = r"a (small|large) (\w+) (\w+)"
_RELATION = re.compile(rf"^{_PHRASE} (to the left of|to the right of|above|below) {_PHRASE}$")


def _colour_mask(pixels: np.ndarray, colour: str) -> np.ndarray:
  """bool [H, W]: pixels within 60 (L2, RGB) of a named shape colour."""
  return np.linalg.norm(pixels.astype(np.float64) - COLOURS[colour], axis=-1) < 60


def _centre(bb):
  return bb[0] + bb[2] / 2, bb[1] + bb[3] / 2


@pytest.mark.parametrize("size", [64, 97])
def test_boxes_are_the_tight_boxes_of_the_drawn_shapes(size):
  world = ShapesWorld(WorldConfig(image_size=size))
  for i in range(25):
    rec = world.record(F.REGION, i)
    pixels = checks.decode_image(rec["image"], rec["id"], "image")
    assert pixels.shape == (size, size, 3)
    objects = [e for e in rec["elems"] if e["attributes"]]  # region elems have none
    covered = np.zeros(pixels.shape[:2], bool)
    for e in objects:
      x, y, w, h = (int(v) for v in e["bb"])
      colour = e["attributes"][0]
      assert e["attributes"][1].endswith(colour) and e["captions"][0] in synthetic.SHAPES
      inside = _colour_mask(pixels[y : y + h, x : x + w], colour)
      # The shape's colour fills its box (a triangle or diamond covers about half of it) ...
      assert inside.mean() > 0.45, (rec["id"], e)
      # ... and the box is exactly the tight box of those pixels.
      rows, cols = np.nonzero(inside)
      assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (0, 0, w, h)
      covered[y : y + h, x : x + w] = True
    # Outside every object box there is only background.
    far = np.linalg.norm(pixels[~covered].astype(np.float64) - synthetic.BACKGROUND, axis=-1)
    assert far.max() < 50
    # Region elems are the union boxes of two object boxes.
    boxes = [tuple(e["bb"]) for e in objects]
    for e in rec["elems"][len(objects) :]:
      m = _RELATION.match(e["captions"][0])
      assert m, e["captions"][0]
      x0, y0, w, h = e["bb"]
      inner = [
        b
        for b in boxes
        if b[0] >= x0 and b[1] >= y0 and b[0] + b[2] <= x0 + w and b[1] + b[3] <= y0 + h
      ]
      assert len(inner) >= 2


def test_captions_describe_the_scene():
  world = ShapesWorld()
  n_rel = 0
  for i in range(40):
    pixels, shapes = world.scene(i, F.IMAGE)
    rec = world.record(F.IMAGE, i)
    listing, other = rec["captions"]
    for s in shapes:
      assert f"{s.size} {s.colour} {s.shape}" in listing
      assert _colour_mask(pixels, s.colour).any()
    if len(shapes) == 1:
      assert other.startswith(f"a {shapes[0].colour} {shapes[0].shape} at the ")
      continue
    n_rel += 1
    m = _RELATION.match(other)
    assert m, other
    find = {(s.size, s.colour, s.shape): s for s in shapes}
    a, rel, b = find[m.group(1, 2, 3)], m.group(4), find[m.group(5, 6, 7)]
    (ax, ay), (bx, by) = _centre(a.bb), _centre(b.bb)
    expect = {
      "to the left of": ax < bx,
      "to the right of": ax > bx,
      "above": ay < by,
      "below": ay > by,
    }
    assert expect[rel], (other, a, b)
  assert n_rel > 10


def test_video_captions_match_the_motion():
  world = ShapesWorld()
  multi = 0
  for i in range(20):
    rec = world.record(F.VIDEO, i)
    assert 3 <= sum(len(c) for c in rec["clips"]) <= 8
    multi += len(rec["clips"]) == 2
    assert rec["is_continuous"] == (len(rec["clips"]) == 2)
    for clip, caption in zip(rec["clips"], rec["captions"]):
      colour = caption.split()[1]
      xs, ys = [], []
      for j, frame in enumerate(clip):
        rows, cols = np.nonzero(_colour_mask(checks.decode_image(frame, rec["id"], f"{j}"), colour))
        xs.append(cols.mean())
        ys.append(rows.mean())
      if len(clip) < 2:
        continue
      dx, dy = xs[-1] - xs[0], ys[-1] - ys[0]
      direction = caption.split()[-1]
      assert {"left": dx < 0, "right": dx > 0, "up": dy < 0, "down": dy > 0}[direction], caption
  assert multi >= 1


def test_seeded_determinism_and_heldout_split():
  a, b = ShapesWorld(seed=synthetic.TRAIN_SEED), ShapesWorld(seed=synthetic.TRAIN_SEED)
  held = ShapesWorld(seed=synthetic.HELDOUT_SEED)
  for kind in F.KINDS:
    assert a.record(kind, 5) == b.record(kind, 5)
    assert a.record(kind, 5) != a.record(kind, 6)
    train = {
      a.record(kind, i).get("image", b"") or a.record(kind, i)["clips"][0][0] for i in range(10)
    }
    heldout = {
      held.record(kind, i).get("image", b"") or held.record(kind, i)["clips"][0][0]
      for i in range(10)
    }
    assert not train & heldout
  # Order of generation does not matter: index 7 alone equals index 7 after others.
  fresh = ShapesWorld()
  assert fresh.record(F.REGION, 7) == a.record(F.REGION, 7)


def test_jpeg_option_and_in_memory_source():
  src = synthetic.SyntheticSource(F.IMAGE, 5, ShapesWorld(WorldConfig(image_format="jpeg")))
  assert len(src) == 5 and src[-1] == src[4]
  assert src[0]["image"][:2] == b"\xff\xd8"
  assert checks.decode_image(src[0]["image"], "x", "image").shape == (64, 64, 3)
  with pytest.raises(IndexError):
    src[5]
  with pytest.raises(ValueError, match="image_size"):
    ShapesWorld(WorldConfig(image_size=16))


def test_region_records_without_whole_image_caption(tmp_path):
  """region_caption=False: the same scenes and elems, no optional "caption" key in the JSON
  line, and every text of a region example is a boxed phrase (is_image = 0)."""
  from data_pipelines import assets, examples, sources
  from data_pipelines.text_ops import Tokenizer

  plain, bare = ShapesWorld(), ShapesWorld(WorldConfig(region_caption=False))
  a, b = plain.record(F.REGION, 3), bare.record(F.REGION, 3)
  assert a["captions"] and b["captions"] == [] and a["elems"] == b["elems"]
  assert a["image"] == b["image"]
  [path] = synthetic.write_jsonl(bare, F.REGION, 6, tmp_path, n_files=1)
  assert all('"caption": "' not in line.split('"elems"')[0] for line in open(path))
  src = sources.JsonLinesSource(path, F.REGION)
  tok = Tokenizer(assets.minilm_dir(), 16)
  cfg = F.PreprocConfig(image_res=64, max_tokens=16, max_masks=4)
  for i in range(len(src)):
    ex = examples.make_example(F.REGION, src[i], np.random.default_rng(i), cfg, tok)
    assert ex[F.IS_IMAGE].tolist() == [0] * len(ex[F.IS_IMAGE])
