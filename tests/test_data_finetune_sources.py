"""Fine-tuning file formats: JSON-array retrieval files and JSON frame files (video retrieval).

Each reader is checked for its records (ids, image ids, configurable keys) and for its bad
entries: the skip reason and field, the counts of a training pass, and the validator.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from data_pipelines import arrayrecord, mixture, sources
from data_pipelines import features as F
from data_pipelines.tools import convert_jsonl, validate

_LINE = re.compile(r"^(\S+:\d+): (\w+): (\S+): ")


def _png(colour=(200, 10, 10), size=(12, 9)) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _dump(path, obj):
  path.write_text(json.dumps(obj))
  return str(path)


@pytest.fixture(scope="module")
def tokenizer():
  return validate.default_tokenizer(16)


def _sizes(kind, b=2):
  attr = {F.IMAGE: "image_batch", F.VIDEO: "video_batch"}[kind]
  return F.BatchSizes(
    image_res=16, patch_size=8, max_tokens=16, max_masks=4, frame_len=2, **{attr: b}
  )


def _one_pass(kind, entry, tokenizer):
  """(valid rows, image ids of valid rows, skip counts) of one unshuffled epoch."""
  pre = F.PreprocConfig(image_res=16, patch_size=8, max_tokens=16, max_masks=4, frame_len=2)
  ds = mixture.kind_dataset(
    kind, [mixture.build_source(kind, entry)], _sizes(kind), pre, tokenizer,
    seed=0, num_epochs=1, shuffle=False,
  )  # fmt: skip
  it = mixture.MixedBatchIterator(ds)
  rows = [(b[kind][F.VALID], b[kind][F.IMAGE_ID]) for b in it]
  ids = [int(i) for v, ii in rows for i in ii[v == 1]]
  return len(ids), ids, it.skip_counts()[kind]


def _cli(capsys, argv):
  code = validate.main(argv)
  out = capsys.readouterr().out.splitlines()
  listed = sorted((m.group(1), m.group(2), m.group(3)) for m in map(_LINE.match, out) if m)
  return code, listed


def _retrieval_files(tmp_path):
  root = tmp_path / "img"
  root.mkdir()
  (root / "a.png").write_bytes(_png())
  (root / "b.png").write_bytes(_png((0, 90, 200)))
  train = [
    {"image": "a.png", "caption": "a red picture", "image_id": 7},
    {"image": "a.png", "caption": "red again", "image_id": 7},
    {"image": "b.png", "caption": "a blue picture", "image_id": "coco_8"},
    ["not", "an", "object"],  # 4: bad_json
    {"image": "b.png", "image_id": 8},  # 5: bad_field_type (caption)
    {"image": "missing.png", "caption": "x", "image_id": 9},  # 6: missing_image
    {"image": "b.png", "caption": "  ", "image_id": 8},  # 7: empty_caption
    {"image": "b.png", "caption": "fine", "image_id": [8]},  # 8: bad_field_type (image_id)
    {"image": "b.png", "caption": "!!!", "image_id": 8},  # 9: empty_caption after pre_caption
  ]
  test = [{"image": "a.png", "caption": ["one", "two", "three", "four", "five"]}]
  return root, _dump(tmp_path / "train.json", train), _dump(tmp_path / "test.json", test)


def test_retrieval_json_array_records_and_bad_entries(tmp_path, tokenizer, capsys):
  root, train, test = _retrieval_files(tmp_path)
  src = mixture.build_source(F.IMAGE, {"type": "json", "path": train, "image_root": str(root)})
  assert isinstance(src, sources.JsonArraySource) and len(src) == 9
  rec = src[2]
  assert (rec["id"], rec["captions"], rec["image_id"]) == (
    "train.json:3",
    ["a blue picture"],
    "coco_8",
  )
  assert rec["image"] == (root / "b.png").read_bytes() and src.location(2) == (train, 3)
  expected = {
    3: ("bad_json", "<line>"),
    4: ("bad_field_type", "caption"),
    5: ("missing_image", "image"),
    6: ("empty_caption", "caption"),
    7: ("bad_field_type", "image_id"),
  }
  for i, (reason, field) in expected.items():
    with pytest.raises(F.SkipRecord) as e:
      src[i]
    assert (e.value.reason, e.value.field, e.value.record_id) == (
      reason,
      field,
      f"train.json:{i + 1}",
    )
  n, ids, skips = _one_pass(
    F.IMAGE, {"type": "json", "path": train, "image_root": str(root)}, tokenizer
  )
  assert n == 3 and ids == [F.image_id_hash("7")] * 2 + [F.image_id_hash("coco_8")]
  assert skips == {"bad_json": 1, "bad_field_type": 2, "missing_image": 1, "empty_caption": 2}
  # The validator reads the same array (kind inferred, fine-tuning defaults) and reports them all.
  code, listed = _cli(capsys, [train, "--image-root", str(root), "--max-tokens", "16"])
  assert code == 1 and [(loc, r) for loc, r, _ in listed] == sorted(
    [(f"{train}:{i + 1}", r) for i, (r, _) in expected.items()] + [(f"{train}:9", "empty_caption")]
  )
  # Eval entries: one record per image with its caption list.
  ev = mixture.build_source(F.IMAGE, {"type": "json", "path": test, "image_root": str(root)})
  assert len(ev) == 1 and ev[0]["captions"] == ["one", "two", "three", "four", "five"]
  assert "image_id" not in ev[0]  # IMAGE_ID falls back to the record id "test.json:1"


def test_configurable_keys_and_arrayrecord_keeps_image_ids(tmp_path):
  (tmp_path / "x.png").write_bytes(_png())
  path = _dump(tmp_path / "t.json", [{"img": "x.png", "sent": ["s1", "s2"], "iid": 3}])
  keys = {"image_key": "img", "caption_key": "sent", "image_id_key": "iid"}
  for entry in (
    {"type": "json", "path": path, **keys},
    {"type": "json", "path": path, "keys": keys},
  ):
    rec = mixture.build_source(F.IMAGE, entry)[0]  # image_root defaults to the file's directory
    assert (rec["captions"], rec["image_id"]) == (["s1", "s2"], "3")
  with pytest.raises(ValueError, match="unknown format keys"):
    mixture.build_source(F.IMAGE, {"type": "json", "path": path, "keys": {"bogus": 1}})
  with pytest.raises(ValueError, match="not an array"):
    sources.JsonArraySource(_dump(tmp_path / "o.json", {"a": 1}), F.IMAGE)
  # A JSON array converts to ArrayRecord with its image ids (and records without keep none).
  fmt = mixture.build_source(F.IMAGE, {"type": "json", "path": path, **keys}).fmt
  stats = convert_jsonl.convert(path, str(tmp_path / "ar"), F.IMAGE, fmt, check=False)
  assert stats.written == 1
  ar = arrayrecord.ArrayRecordSource(tmp_path / "ar")
  assert ar[0] == mixture.build_source(F.IMAGE, {"type": "json", "path": path, **keys})[0]


def _frames_json(n, colour=(10, 200, 10)):
  return [base64.b64encode(_png(colour)).decode() for _ in range(n)]


def test_video_frames_files_and_bad_entries(tmp_path, tokenizer, capsys):
  root = tmp_path / "frames"
  root.mkdir()
  _dump(root / "v1.json", _frames_json(3))
  _dump(root / "v2.json", _frames_json(1, (9, 9, 9)))
  _dump(root / "empty.json", [])
  _dump(root / "dict.json", {"frames": []})
  (root / "broken.json").write_text('["iVBO')
  _dump(root / "nob64.json", ["***"])
  keys = {"image_key": "video", "caption_key": "text", "image_id_key": "video_id"}
  entries = [
    {"video_id": "v1", "video": "v1.json", "text": "a green square"},
    {"video_id": "v2", "video": "v2.json", "text": ["dark", "very dark"]},
    {"video_id": "v3", "video": "nope.json", "text": "x"},  # missing_image
    {"video_id": "v4", "video": "empty.json", "text": "x"},  # empty_video
    {"video_id": "v5", "video": "dict.json", "text": "x"},  # corrupt_image
    {"video_id": "v6", "video": "broken.json", "text": "x"},  # corrupt_image
    {"video_id": "v7", "video": "nob64.json", "text": "x"},  # corrupt_image (base64)
    {"video_id": "v8", "video": ["v1.json"], "text": "x"},  # bad_field_type (not a path)
  ]
  path = _dump(tmp_path / "video_train.json", entries)
  entry = {"type": "json", "path": path, "image_root": str(root), **keys}
  src = mixture.build_source(F.VIDEO, entry)
  rec = src[0]
  assert rec["clips"] == [[_png((10, 200, 10))] * 3] and rec["image_id"] == "v1"
  assert rec["is_continuous"] is False and src[1]["captions"] == ["dark", "very dark"]
  reasons = []
  for i in range(2, len(entries)):
    with pytest.raises(F.SkipRecord) as e:
      src[i]
    assert e.value.field.startswith("video")
    reasons.append(e.value.reason)
  assert reasons == ["missing_image", "empty_video"] + ["corrupt_image"] * 3 + ["bad_field_type"]
  n, ids, skips = _one_pass(F.VIDEO, entry, tokenizer)
  assert n == 2 and ids == [F.image_id_hash("v1"), F.image_id_hash("v2")]
  assert skips == {"missing_image": 1, "empty_video": 1, "corrupt_image": 3, "bad_field_type": 1}
  # The kind of a frames-file array is inferred; keys come from the flags.
  assert sources.detect_kind(path) == F.VIDEO
  argv = [path, "--image-root", str(root), "--image-key", "video", "--caption-key", "text"]
  code, listed = _cli(capsys, argv + ["--max-tokens", "16"])
  assert code == 1 and len(listed) == 6 and {r for _, r, _ in listed} == set(skips)
