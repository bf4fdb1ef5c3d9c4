"""RefCOCO-style grounding source: REFER refs + COCO instances + split files, bad entries."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from data_pipelines import examples, image_ops, mixture, refcoco, synthetic_tasks
from data_pipelines import features as F
from data_pipelines.tools import validate

_LINE = re.compile(r"^(\S+:\d+): (\w+): (\S+): ")
PRE = F.PreprocConfig(
  image_res=32, patch_size=8, max_tokens=16, max_masks=4, max_regions=1, careful_hflip=True,
  exact_boxes=True, crop_scale=(0.5, 1.0),
)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return synthetic_tasks.write_grounding(tmp_path_factory.mktemp("grd"), n_train=6)


@pytest.fixture(scope="module")
def tokenizer():
  return validate.default_tokenizer(16)


def _pass(entry, tokenizer, batch=4):
  sizes = F.BatchSizes(
    image_res=32, patch_size=8, max_tokens=16, max_masks=4, region_batch=batch,
    region_max_images=batch,
  )  # fmt: skip
  src = mixture.build_source(F.REGION, entry)
  ds = mixture.kind_dataset(
    F.REGION, [src], sizes, PRE, tokenizer, seed=0, num_epochs=1, shuffle=False
  )
  it = mixture.MixedBatchIterator(ds)
  batches = [b[F.REGION] for b in it]
  return batches, it.skip_counts()[F.REGION]


def test_records_boxes_ids_and_split_filter(files):
  refs = {r["ref_id"]: r for r in pickle.load(open(files.refs, "rb"))}
  anns = {a["id"]: a for a in json.load(open(files.instances))["annotations"]}
  test_entries = json.load(open(files.test))
  by_split = {}
  for split in ("train", "val", "testA", "testB"):
    src = mixture.build_source(F.REGION, files.source(split))
    assert isinstance(src, refcoco.RefcocoSource)
    by_split[split] = [src[i] for i in range(len(src))]
    for rec in by_split[split]:
      ref_id, k = re.fullmatch(r"ref(\d+):(\d+)", rec["id"]).groups()
      ref = refs[int(ref_id)]
      assert ref["split"] == split and rec["captions"] == []
      (elem,) = rec["elems"]
      assert elem["bb"] == anns[ref["ann_id"]]["bbox"] and elem["attributes"] == []
      assert elem["captions"] == [ref["sentences"][int(k)]["sent"]]
  # The mixed test file splits into its testA and testB parts, nothing lost.
  assert len(by_split["testA"]) + len(by_split["testB"]) == len(test_entries)
  unfiltered = refcoco.RefcocoSource(files.test, files.refs, files.instances, files.image_root)
  assert [unfiltered[i]["id"] for i in range(len(unfiltered))] == [
    r["id"] for r in by_split["testA"] + by_split["testB"]
  ]
  with pytest.raises(ValueError, match="needs 'refs'"):
    refcoco.RefcocoSource(files.test, split="val")
  with pytest.raises(ValueError, match="both"):
    refcoco.RefcocoSource(files.test, refs=files.refs)
  with pytest.raises(ValueError, match="unknown split"):
    refcoco.RefcocoSource(files.test, files.refs, files.instances, split="dev")


def test_training_pass_has_one_exact_box_per_expression(files, tokenizer):
  batches, skips = _pass(files.source("train"), tokenizer)
  n = len(json.load(open(files.train)))
  valid = sum(int(b[F.VALID].sum()) for b in batches)
  assert skips == {} and valid == n
  for b in batches:
    v = b[F.VALID] == 1
    assert (b[F.IS_IMAGE][v] == 0).all() and sorted(b[F.IMAGE_INDEX][v]) == list(range(v.sum()))
    box = b[F.BOX][v]
    assert ((box >= 0) & (box <= 1)).all() and (box[:, 2:] > 0).all()


def _bad_files(tmp_path, files):
  """A split file with one entry per fault; returns (path, {entry index: (reason, field)})."""
  refs = pickle.load(open(files.refs, "rb"))
  inst = json.load(open(files.instances))
  good = json.load(open(files.train))[0]
  ref0 = dict(refs[good["ref_id"]])
  # Two extra refs: one whose annotation is missing, one whose box leaves the image.
  inst["annotations"].append({"id": 9001, "image_id": 1, "bbox": [50.0, 50.0, 20.0, 5.0]})
  refs = refs + [
    dict(ref0, ref_id=9000, ann_id=424242),
    dict(ref0, ref_id=9001, ann_id=9001),
    dict(ref0, ref_id=9002, ann_id=9002),
  ]
  inst["annotations"].append({"id": 9002, "image_id": 1, "bbox": [1, 2, "w", 4]})
  entries = [
    good,
    {"image": good["image"], "text": good["text"]},
    dict(good, ref_id=123456),
    dict(good, ref_id=9000),
    dict(good, ref_id=9001),
    dict(good, image="nowhere.png"),
    dict(good, text=" "),
    "an entry",
    dict(good, ref_id=9002),
    dict(good, text=["a", "list"]),
  ]
  expected = {
    2: ("bad_field_type", "ref_id"),
    3: ("bad_field_type", "ref_id"),
    4: ("bad_field_type", "ann_id"),
    5: ("bad_box", "elems"),
    6: ("missing_image", "image"),
    7: ("empty_caption", "text"),
    8: ("bad_json", "<entry>"),
    9: ("bad_field_type", "annotations[9002].bbox"),
    10: ("bad_field_type", "text"),
  }
  (tmp_path / "bad.json").write_text(json.dumps(entries))
  (tmp_path / "refs.p").write_bytes(pickle.dumps(refs))
  (tmp_path / "inst.json").write_text(json.dumps(inst))
  return str(tmp_path / "bad.json"), str(tmp_path / "refs.p"), str(tmp_path / "inst.json"), expected


def test_bad_entries_are_skipped_counted_and_validated(tmp_path, files, tokenizer, capsys):
  path, refs, inst, expected = _bad_files(tmp_path, files)
  entry = {"type": "refcoco", "path": path, "refs": refs, "instances": inst}
  entry["image_root"] = files.image_root
  src = mixture.build_source(F.REGION, entry)
  for index, (reason, field) in expected.items():
    if reason == "bad_box":
      continue  # found by the shared region checks, not by the reader
    with pytest.raises(F.SkipRecord) as e:
      src[index - 1]
    assert (e.value.reason, e.value.field) == (reason, field)
    assert src.location(index - 1) == (path, index)
  batches, skips = _pass(entry, tokenizer, batch=2)
  assert sum(int(b[F.VALID].sum()) for b in batches) == 1
  counts: dict[str, int] = {}
  for reason, _ in expected.values():
    counts[reason] = counts.get(reason, 0) + 1
  assert skips == counts
  argv = [path, "--refs", refs, "--instances", inst, "--image-root", files.image_root]
  assert validate.main(argv + ["--max-tokens", "16"]) == 1
  out = capsys.readouterr().out.splitlines()
  listed = sorted((m.group(1), m.group(2)) for m in map(_LINE.match, out) if m)
  assert listed == sorted((f"{path}:{i}", r) for i, (r, _) in expected.items())
  with pytest.raises(ValueError, match="region records"):
    mixture.build_source(F.IMAGE, entry)


def _official_target(box, crop, flip, res):
  """The official grounding box target: crop shift, careful flip, resize, normalise."""
  x, y, w, h = box
  cw, ch = crop.x1 - crop.x0, crop.y1 - crop.y0
  x, y = x - crop.x0, y - crop.y0
  if flip:
    x = (cw - x) - w
  x, w, y, h = x * res / cw, w * res / cw, y * res / ch, h * res / ch
  return np.array([(x + w / 2) / res, (y + h / 2) / res, w / res, h / res])


@pytest.mark.parametrize("text", ["the striped thing", "the thing on the LEFT"])
def test_grounding_example_matches_the_official_transform(tokenizer, text):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  box = [5.6, 7.3, 20.2, 15.9]  # fractional pixels, as RefCOCO boxes are
  rec = {"kind": F.REGION, "id": "r", "image": buf.getvalue(), "captions": []}
  rec["elems"] = [{"bb": box, "captions": [text], "attributes": []}]
  careful = "left" in text.lower()
  flips, truncated_differs = 0, False
  for seed in range(24):
    ex = examples.make_example(F.REGION, rec, np.random.default_rng(seed), PRE, tokenizer)
    replay = np.random.default_rng(seed)
    replay.integers(0, 1)  # the anchor elem
    crop = image_ops.sample_region_crop(box, 50, 40, replay)
    flip = bool(replay.random() < 0.5) and not careful
    flips += flip
    np.testing.assert_allclose(ex[F.BOX][0], _official_target(box, crop, flip, 32), atol=1e-6)
    assert ex[F.PIXELS].shape == (32, 32, 3) and ex[F.IS_IMAGE].tolist() == [0]
    pre = dataclasses.replace(PRE, exact_boxes=False)  # pre-training: int() boxes
    old = examples.make_example(F.REGION, rec, np.random.default_rng(seed), pre, tokenizer)
    truncated_differs |= not np.allclose(old[F.BOX][0], ex[F.BOX][0], atol=1e-3)
  assert (flips == 0) if careful else (flips > 0)
  assert truncated_differs
