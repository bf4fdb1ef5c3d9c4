"""JSON-lines and ArrayRecord sources: official value forms, errors, indices, reader parity."""

import base64
import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from data_pipelines import arrayrecord, checks, jsonl_format, sources, synthetic
from data_pipelines import features as F
from data_pipelines.features import SkipRecord
from data_pipelines.tools import convert_jsonl

N = 30  # records per kind in the parity test


def _png(w=7, h=5, colour=(200, 10, 10)) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


B64 = base64.b64encode(_png()).decode()


@pytest.fixture(scope="module")
def world():
  return synthetic.ShapesWorld()


@pytest.mark.parametrize("kind", F.KINDS)
def test_jsonl_and_arrayrecord_yield_identical_records(tmp_path, world, kind):
  jdir = tmp_path / "jsonl"
  synthetic.write_jsonl(world, kind, N, jdir, n_files=3)
  jsrc = sources.JsonLinesSource(jdir, kind)
  from_jsonl = [jsrc[i] for i in range(len(jsrc))]
  assert from_jsonl == [world.record(kind, i) for i in range(N)]
  # The converter path (no tokenizer checks here; test_data_validate covers them).
  stats = convert_jsonl.convert(str(jdir), str(tmp_path / "ar"), kind, check=False)
  assert stats.written == N and not stats.problems
  asrc = sources.open_source(tmp_path / "ar")
  assert isinstance(asrc, arrayrecord.ArrayRecordSource) and asrc.kind == kind
  assert [asrc[i] for i in range(len(asrc))] == from_jsonl
  assert asrc.__getitems__([4, 0]) == [from_jsonl[4], from_jsonl[0]]
  # The synthetic world's own ArrayRecord writer gives the same records.
  direct = sources.open_source(synthetic.write_arrayrecord(world, kind, N, tmp_path / "direct"))
  assert [direct[i] for i in range(N)] == from_jsonl
  clone = pickle.loads(pickle.dumps(asrc))  # grain workers receive pickled sources
  assert clone[N - 1] == from_jsonl[N - 1]
  with pytest.raises(IndexError):
    asrc[N]


def test_arrayrecord_keeps_odd_values_exactly(tmp_path):
  record = {
    "kind": F.REGION,
    "id": "r-ü",
    "image": b"\x00\xffnot-decoded",
    "captions": [],
    "elems": [
      {"bb": [10.3, 1e-7, 2.5e9, -0.0], "captions": ["ünïcode", ""], "attributes": []},
      {"bb": [0.0, 1.0, 2.0, 3.0], "captions": ["x"], "attributes": ["a", "b c"]},
    ],
  }
  video = {
    "kind": F.VIDEO,
    "id": "v",
    "clips": [[b"f1", b"f2"], [b"f3"]],
    "captions": ["one", "two"],
    "is_continuous": True,
  }
  r = sources.open_source(arrayrecord.write([record], F.REGION, tmp_path / "r"))
  v = sources.open_source(arrayrecord.write([video], F.VIDEO, tmp_path / "v"))
  assert r[0] == record and v[0] == video
  with pytest.raises(FileExistsError):
    arrayrecord.write([record], F.REGION, tmp_path / "r")
  with pytest.raises(ValueError, match="not 'image'"):
    sources.open_source(tmp_path / "v", kind=F.IMAGE)


def test_directory_source_skips_success_and_indexes_lines(tmp_path):
  d = tmp_path / "src"
  d.mkdir()
  line = json.dumps({"binary": B64, "desc": "a red box"})
  # Blank lines, CRLF endings and a missing final newline: only real lines are records, and
  # ids carry the true 1-based line numbers.
  (d / "a.jsonl").write_bytes(f"{line}\n\n{line}\r\n\r\n{line}".encode())
  (d / "b_SUCCESS").write_text("not json at all\n")
  (d / "_SUCCESS").write_text("")
  (d / ".hidden.crc").write_text("garbage\n")
  (d / "c.jsonl").write_text(json.dumps({"binary": B64, "desc": ["x", "y"], "id": 77}) + "\n")
  cache = tmp_path / "cache"
  src = sources.JsonLinesSource(d, F.IMAGE, index_cache_dir=str(cache))
  assert [os.path.basename(f) for f in src.files] == ["a.jsonl", "c.jsonl"]
  assert len(src) == 4
  assert [src[i]["id"] for i in range(4)] == ["a.jsonl:1", "a.jsonl:3", "a.jsonl:5", "77"]
  assert src.location(2)[1] == 5 and src[3]["captions"] == ["x", "y"]
  assert src[1]["image"] == _png()
  assert len(list(cache.iterdir())) == 2  # on-disk indices, reused by a fresh process
  sources._INDEX_CACHE.clear()
  assert len(sources.JsonLinesSource(d, F.IMAGE, index_cache_dir=str(cache))) == 4
  assert sources.detect_kind(d) == F.IMAGE
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.JsonLinesSource(tmp_path / "nope", F.IMAGE)


def test_official_value_forms():
  parse = jsonl_format.parse_line
  img = parse(
    F.IMAGE, json.dumps({"binary": B64, "desc": {"en": "a cat", "de": "eine katze"}}), "f:1"
  )
  assert img["captions"] == ["a cat", "eine katze"] and img["image"] == _png()
  fmt = jsonl_format.default_format(F.IMAGE, language="de", caption_key="text", image_key="img")
  assert parse(F.IMAGE, json.dumps({"img": B64, "text": {"de": "k"}}), "f:1", fmt)["captions"] == [
    "k"
  ]
  reg = parse(
    F.REGION,
    json.dumps(
      {
        "binary": B64,
        "elems": [{"bb": [1, 2, 3, 4], "caption": ["dog", "puppy"], "attributes": "brown"}],
      }
    ),
    "f:2",
  )
  assert reg["captions"] == [] and reg["elems"] == [
    {"bb": [1.0, 2.0, 3.0, 4.0], "captions": ["dog", "puppy"], "attributes": ["brown"]}
  ]
  one = parse(F.VIDEO, json.dumps({"video_frames": [B64, B64], "text": ["a", "b"]}), "f:3")
  assert one["clips"] == [[_png(), _png()]] and one["captions"] == ["a", "b"]
  assert one["is_continuous"] is False
  two = parse(
    F.VIDEO,
    json.dumps({"video_frames": [[B64], [B64, B64]], "text": ["a", "b"], "is_continuous": True}),
    "f:4",
  )
  assert [len(c) for c in two["clips"]] == [1, 2] and two["is_continuous"] is True
  # to_line is the inverse of parse_line for canonical records.
  for rec in (img, reg, one, two):
    assert parse(rec["kind"], jsonl_format.to_line(rec), rec["id"]) == rec


GOOD = {
  F.IMAGE: {"binary": B64, "desc": "a cat"},
  F.REGION: {"binary": B64, "caption": "x", "elems": [{"bb": [0, 0, 2, 2], "caption": "y"}]},
  F.VIDEO: {"video_frames": [[B64], [B64]], "text": ["a", "b"], "is_continuous": False},
}


@pytest.mark.parametrize(
  "kind,change,reason,field",
  [
    (F.IMAGE, "{not json", "bad_json", "<line>"),
    (F.IMAGE, "[1, 2]", "bad_json", "<line>"),
    (F.IMAGE, {"desc": None}, "bad_field_type", "desc"),
    (F.IMAGE, {"binary": 3}, "bad_field_type", "binary"),
    (F.IMAGE, {"desc": "  \n"}, "empty_caption", "desc"),
    (F.IMAGE, {"desc": []}, "empty_caption", "desc"),
    (F.IMAGE, {"binary": "@@@"}, "corrupt_image", "binary"),
    (F.IMAGE, {"binary": ""}, "corrupt_image", "binary"),
    (F.IMAGE, {"id": [1]}, "bad_field_type", "id"),
    (F.REGION, {"elems": {}}, "bad_field_type", "elems"),
    (F.REGION, {"elems": []}, "no_usable_elem", "elems"),
    (F.REGION, {"elems": [{"bb": [0, 0, 1], "caption": "y"}]}, "bad_field_type", "elems[0].bb"),
    (
      F.REGION,
      {"elems": [{"bb": [0, 0, True, 1], "caption": "y"}]},
      "bad_field_type",
      "elems[0].bb",
    ),
    (F.REGION, {"elems": [{"bb": [0, 0, 1, 1]}]}, "bad_field_type", "elems[0].caption"),
    (
      F.REGION,
      {"elems": [{"bb": [0, 0, 10**400, 1], "caption": "y"}]},
      "bad_field_type",
      "elems[0].bb",
    ),
    (
      F.REGION,
      {"elems": [{"bb": [0, 0, 1, 1], "caption": "y", "attributes": 5}]},
      "bad_field_type",
      "elems[0].attributes",
    ),
    (F.REGION, {"caption": ""}, "empty_caption", "caption"),
    (F.VIDEO, {"video_frames": []}, "empty_video", "video_frames"),
    (F.VIDEO, {"video_frames": [[B64], []]}, "empty_video", "video_frames[1]"),
    (F.VIDEO, {"video_frames": [B64, [B64]]}, "bad_field_type", "video_frames"),
    (F.VIDEO, {"text": ["only one"]}, "bad_field_type", "text"),
    (F.VIDEO, {"is_continuous": "yes"}, "bad_field_type", "is_continuous"),
    (F.VIDEO, {"video_frames": [[B64], ["%%"]]}, "corrupt_image", "video_frames[1][0]"),
  ],
)
def test_reader_faults_raise_skip_record(kind, change, reason, field):
  line = change if isinstance(change, str) else json.dumps({**GOOD[kind], **change})
  with pytest.raises(SkipRecord) as e:
    jsonl_format.parse_line(kind, line, "file.jsonl:9")
  assert (e.value.reason, e.value.field) == (reason, field)
  assert str(e.value).startswith(f"file.jsonl:9: {reason} in field {field!r}")


def test_path_images_and_missing_file(tmp_path, world):
  d = tmp_path / "p"
  synthetic.write_jsonl(world, F.REGION, 4, d, n_files=1, rpath=True)
  fmt = jsonl_format.default_format(F.REGION, is_image_rpath=True)
  src = sources.JsonLinesSource(d, F.REGION, fmt)
  assert [src[i] for i in range(4)] == [world.record(F.REGION, i) for i in range(4)]
  os.remove(d / "images" / "shapes-0-region-000002.png")
  with pytest.raises(SkipRecord) as e:
    src[2]
  assert (e.value.reason, e.value.field) == ("missing_image", "binary")
  # Relative paths resolve against image_root when one is given.
  moved = tmp_path / "elsewhere"
  moved.mkdir()
  os.rename(d / "images", moved / "images")
  fmt2 = jsonl_format.default_format(F.REGION, is_image_rpath=True, image_root=str(moved))
  assert sources.JsonLinesSource(d, F.REGION, fmt2)[0] == world.record(F.REGION, 0)


def test_decode_image_rejects_every_broken_file():
  good = _png(9, 4)
  assert checks.decode_image(good, "r", "image").shape == (4, 9, 3)
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(
    buf, format="JPEG"
  )
  jpeg = buf.getvalue()
  gray = io.BytesIO()
  Image.fromarray(np.zeros((3, 3), np.uint8)).save(gray, format="PNG")
  assert checks.decode_image(gray.getvalue(), "r", "image").shape == (3, 3, 3)  # -> RGB
  for bad in (b"", good[: len(good) // 2], jpeg[: len(jpeg) // 2], b"garbage" * 10):
    with pytest.raises(SkipRecord, match="r: corrupt_image in field 'image'"):
      checks.decode_image(bad, "r", "image")


def test_box_rule_truncates_like_the_official_code():
  # int() truncation towards zero (docs/fidelity.md#region-records): a 0.9-px wide box has w = 0.
  assert not checks.box_ok([0.5, 0, 0.9, 5], 10, 10)
  assert checks.box_ok([-0.5, 0, 3, 5], 10, 10)  # int(-0.5) == 0
  assert checks.box_ok([7, 0, 3, 10], 10, 10)  # touching the border is inside
  assert not checks.box_ok([8, 0, 3, 10], 10, 10)
  assert not checks.box_ok([0, 0, 3, -1], 10, 10)
  assert not checks.box_ok([0, 0, float("nan"), 1], 10, 10)
