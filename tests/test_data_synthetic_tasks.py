"""Synthetic fine-tuning writers: official files on disk, read back by the production readers."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re

import numpy as np
import pytest

from data_pipelines import checks, mixture, synthetic_tasks
from data_pipelines import features as F
from data_pipelines.synthetic import COLOURS, SHAPES, SIZES
from data_pipelines.tools import validate

SIZES_KW = dict(image_res=32, patch_size=8, max_tokens=16, max_masks=4, frame_len=2)
PRE = F.PreprocConfig(image_res=32, patch_size=8, max_tokens=16, max_masks=4, frame_len=2)


@pytest.fixture(scope="module")
def tokenizer():
  return validate.default_tokenizer(16)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp("tasks")
  return (
    synthetic_tasks.write_retrieval(root / "ret", n_train=6, n_val=4, n_test=4),
    synthetic_tasks.write_grounding(root / "grd", n_train=6, n_val=3, n_testA=3, n_testB=3),
    synthetic_tasks.write_video_retrieval(root / "vid", n_train=4, n_test=3),
  )


def _tree(root):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      out[os.path.relpath(p, root)] = hashlib.sha1(open(p, "rb").read()).hexdigest()
  return out


def test_writers_are_deterministic(tmp_path, written):
  ret = synthetic_tasks.write_retrieval(tmp_path / "ret", n_train=6, n_val=4, n_test=4)
  grd = synthetic_tasks.write_grounding(tmp_path / "grd", n_train=6, n_val=3, n_testA=3, n_testB=3)
  vid = synthetic_tasks.write_video_retrieval(tmp_path / "vid", n_train=4, n_test=3)
  for a, b in zip((ret, grd, vid), written):
    root_a, root_b = (os.path.dirname(x.train) for x in (a, b))
    assert _tree(root_a) == _tree(root_b) and len(_tree(root_a)) > 5
  other = synthetic_tasks.write_retrieval(tmp_path / "s1", n_train=6, n_val=4, n_test=4, seed=1)
  assert json.load(open(other.train)) != json.load(open(ret.train))


def test_retrieval_files_round_trip(written, tokenizer):
  ret = written[0]
  train = json.load(open(ret.train))
  assert len(train) == 6 * 3 and all(set(e) == {"image", "caption", "image_id"} for e in train)
  per_image = {}
  for e in train:
    per_image.setdefault(e["image"], set()).add(e["image_id"])
  assert len(per_image) == 6 and all(len(v) == 1 for v in per_image.values())
  digests = {}
  for split in ("train", "val", "test"):
    src = mixture.build_source(F.IMAGE, ret.source(split))
    for i in range(len(src)):
      digests.setdefault(hashlib.sha1(src[i]["image"]).hexdigest(), set()).add(split)
    if split != "train":
      assert len(src) == 4 and all(len(set(src[i]["captions"])) == 5 for i in range(4))
  assert all(len(s) == 1 for s in digests.values()) and len(digests) == 14  # disjoint splits
  # Training pass: rows of one image share IMAGE_ID, rows of different images do not.
  sizes = F.BatchSizes(image_batch=6, **SIZES_KW)
  pre = F.PreprocConfig(crop_scale=(0.5, 1.0), **{k: v for k, v in SIZES_KW.items()})
  data_cfg = {F.IMAGE: [ret.source("train")], "num_epochs": 1}
  it = mixture.make_train_iterator(data_cfg, sizes, pre, tokenizer, 0, 0, 1)
  ids = np.concatenate([b[F.IMAGE][F.IMAGE_ID][b[F.IMAGE][F.VALID] == 1] for b in it])
  expected = sorted(F.image_id_hash(str(e["image_id"])) for e in train)
  assert sorted(ids.tolist()) == expected and len(set(ids.tolist())) == 6


def test_retrieval_eval_set_groups_the_caption_lists(written, tokenizer):
  from x2vlm_jax.evaluators import eval_data

  src = mixture.build_source(F.IMAGE, written[0].source("val"))
  rs = eval_data.retrieval_set([src], tokenizer, image_res=32)
  assert rs.pixels.shape == (4, 32, 32, 3) and rs.skips == {}
  assert [len(t) for t in rs.img2txt] == [5] * 4 and rs.txt2img.tolist() == np.repeat(
    range(4), 5
  ).tolist()


_HEAD = re.compile(r"^the (?:(small|large) )?(?:(\w+) )?(\w+)")


def _matches(shapes, text):
  """Shapes a description's head ("the [size] [colour] shape-or-name") fits."""
  size, colour, noun = _HEAD.match(text).groups()
  if colour is not None and colour not in COLOURS:  # "the large circle": no colour word
    size, colour = size, None
  return [
    s for s in shapes
    if (size is None or s["size"] == size) and (colour is None or s["colour"] == colour)
    and (noun == "shape" or s["shape"] == noun)
  ]  # fmt: skip


def test_grounding_expressions_name_one_shape_with_its_exact_box(written):
  grd = written[1]
  inst = json.load(open(grd.instances))
  refs = pickle.load(open(grd.refs, "rb"))
  anns = {a["id"]: a for a in inst["annotations"]}
  images = {im["id"]: im for im in inst["images"]}
  assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
  for r in refs:
    im = images[r["image_id"]]
    pixels = checks.decode_image(
      open(os.path.join(grd.image_root, im["file_name"]), "rb").read(), "", ""
    )
    scene = []
    for a in (a for a in inst["annotations"] if a["image_id"] == r["image_id"]):
      x, y, w, h = (int(v) for v in a["bbox"])
      crop = pixels[y : y + h, x : x + w]
      colour = next(c for c, rgb in COLOURS.items() if (crop == rgb).all(-1).any())
      m = (crop == COLOURS[colour]).all(-1)
      # The box is the tight box of the drawn shape: its colour touches all four edges.
      assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()
      size = min(SIZES, key=lambda k: abs(SIZES[k] * im["width"] - max(w, h)))
      shape = SHAPES[a["category_id"] - 1]
      scene.append({"id": a["id"], "colour": colour, "size": size, "shape": shape})
    for sent in r["sentences"]:
      head = sent["sent"].split(" to the ")[0].split(" above ")[0].split(" below ")[0]
      assert [s["id"] for s in _matches(scene, head)] == [r["ann_id"]], sent["sent"]
    assert anns[r["ann_id"]]["bbox"] == [float(v) for v in anns[r["ann_id"]]["bbox"]]


def test_video_retrieval_round_trip(written, tokenizer):
  vid = written[2]
  test = mixture.build_source(F.VIDEO, vid.source("test"))
  assert len(test) == 3 and all(len(test[i]["captions"]) == 2 for i in range(3))
  assert all(re.fullmatch(r"an? \w+ \w+ moves .+", test[i]["captions"][0]) for i in range(3))
  sizes = F.BatchSizes(video_batch=4, **SIZES_KW)
  data_cfg = {F.VIDEO: [vid.source("train")], "num_epochs": 1}
  it = mixture.make_train_iterator(data_cfg, sizes, PRE, tokenizer, 0, 0, 1)
  batches = [b[F.VIDEO] for b in it]
  ids = np.concatenate([b[F.IMAGE_ID][b[F.VALID] == 1] for b in batches])
  train = json.load(open(vid.train))
  assert sorted(ids.tolist()) == sorted(F.image_id_hash(e["video_id"]) for e in train)
  assert it.skip_counts()[F.VIDEO] == {} and batches[0][F.FRAMES].shape == (4, 2, 32, 32, 3)
