"""Fault injection, `check_record` and the validator / converter command lines."""

import base64
import collections
import json
import re

import pytest

from data_pipelines import checks, jsonl_format, sources, synthetic
from data_pipelines import features as F
from data_pipelines.features import SkipRecord
from data_pipelines.testing import faults
from data_pipelines.tools import convert_jsonl, validate

N = 200  # lines per set: 5% = 10 faults, enough to cover every applicable reason
_LINE = re.compile(r"^(\S+:\d+): (\w+): (\S+): ")


@pytest.fixture(scope="module")
def tokenizer():
  return validate.default_tokenizer()


@pytest.fixture(scope="module")
def world():
  return synthetic.ShapesWorld()


def _run_cli(capsys, argv):
  code = validate.main(argv)
  out = capsys.readouterr().out.splitlines()
  listed = [_LINE.match(l).groups() for l in out if _LINE.match(l)]
  counts = {l.split(":")[0].strip(): int(l.split(":")[1]) for l in out if l.startswith("  ")}
  return code, listed, counts


@pytest.mark.parametrize(
  "kind,rpath",
  [(F.IMAGE, False), (F.IMAGE, True), (F.REGION, False), (F.REGION, True), (F.VIDEO, False)],
)
def test_validator_reports_exactly_the_injected_faults(
  tmp_path, capsys, world, tokenizer, kind, rpath
):
  clean = tmp_path / "clean"
  synthetic.write_jsonl(world, kind, N, clean, n_files=2, rpath=rpath)
  fmt = jsonl_format.default_format(kind, is_image_rpath=rpath)
  flags = ["--kind", kind] + (["--rpath"] if rpath else [])
  code, listed, counts = _run_cli(capsys, [str(clean)] + flags)
  assert (code, listed, counts) == (0, [], {})

  injected = faults.inject_faults(clean, tmp_path / "bad", kind, fraction=0.05, seed=1, fmt=fmt)
  assert len(injected) == N // 20
  expected_reasons = faults.applicable_reasons(kind, rpath)
  assert {f.reason for f in injected} == set(expected_reasons)
  # The kind is inferred from the lines when --kind is omitted.
  code, listed, counts = _run_cli(capsys, [str(tmp_path / "bad")] + flags[2:])
  assert code == 1
  assert sorted((loc, reason) for loc, reason, _ in listed) == sorted(
    (f"{f.file}:{f.line}", f.reason) for f in injected
  )
  assert counts == dict(collections.Counter(f.reason for f in injected))
  # The library API reports the same records by id.
  report = validate.validate(str(tmp_path / "bad"), kind, tokenizer, fmt=fmt)
  assert sorted((p.record_id, p.reason) for p in report.problems) == sorted(
    (f.record_id, f.reason) for f in injected
  )


def test_converter_drops_bad_lines_and_validator_reads_arrayrecord(
  tmp_path, capsys, world, tokenizer
):
  clean = tmp_path / "clean"
  synthetic.write_jsonl(world, F.REGION, 60, clean, n_files=1)
  injected = faults.inject_faults(clean, tmp_path / "bad", F.REGION, fraction=8 / 60, seed=3)
  assert convert_jsonl.main(["--kind", F.REGION, str(tmp_path / "bad"), str(tmp_path / "ar")]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["written"] == 60 - len(injected)
  assert summary["skipped"] == dict(collections.Counter(f.reason for f in injected))
  code, listed, _ = _run_cli(capsys, [str(tmp_path / "ar")])
  assert (code, listed) == (0, [])
  bad_lines = {f.line for f in injected}  # one file: record i is on line i + 1
  src = sources.open_source(tmp_path / "ar")
  assert [src[i] for i in range(len(src))] == [
    world.record(F.REGION, i) for i in range(60) if i + 1 not in bad_lines
  ]

  # Without checks, decode/tokenise faults reach the ArrayRecord set, and the validator finds
  # them there (reported as dataset_dir:index): together they are the injected faults.
  stats = convert_jsonl.convert(
    str(tmp_path / "bad"), str(tmp_path / "ar2"), F.REGION, check=False, log=lambda p: None
  )
  report = validate.validate(str(tmp_path / "ar2"), None, tokenizer)
  at_read = {(p.record_id, p.reason) for p in stats.problems}
  at_check = {(p.record_id, p.reason) for p in report.problems}
  assert not at_read & at_check
  assert at_read | at_check == {(f.record_id, f.reason) for f in injected}
  assert {"bad_box", "no_usable_elem", "caption_no_tokens"} <= {r for _, r in at_check}
  assert all(p.location.startswith(stats.dataset_dir + ":") for p in report.problems)


def _region(elems, caption=("three shapes",)):
  img = synthetic.ShapesWorld().record(F.REGION, 0)["image"]  # 64 x 64
  return {
    "kind": F.REGION,
    "id": "r",
    "image": img,
    "captions": list(caption),
    "elems": [{"bb": bb, "captions": caps, "attributes": attrs} for bb, caps, attrs in elems],
  }


def test_check_record_region_rules(tokenizer):
  cfg = F.PreprocConfig()
  good, bad_box = [1, 1, 10, 10], [60, 0, 10, 10]
  # "... red" cleans to "red": an attribute with no word of its own is harmless.
  rec = _region(
    [
      (bad_box, ["dog"], []),
      (good, ["  "], []),
      (good, ["red"], ["big", "..."]),
      (good, ["cat"], ["small"]),
      (good, ["..."], []),
    ]
  )
  checks.check_record(rec, tokenizer, cfg)  # one usable elem is enough
  assert checks.usable_elems(rec, 64, 64, tokenizer, cfg.max_tokens) == [2, 3]
  cases = [
    ([(bad_box, ["dog"], []), ([0, 0, 0, 5], ["cat"], [])], "bad_box"),
    ([(bad_box, ["dog"], []), (good, ["!!"], [])], "no_usable_elem"),
    ([(good, [faults.NO_TOKEN_CAPTION], [])], "no_usable_elem"),
  ]
  for elems, reason in cases:
    with pytest.raises(SkipRecord) as e:
      checks.check_record(_region(elems), tokenizer, cfg)
    assert (e.value.reason, e.value.field) == (reason, "elems")
  with pytest.raises(SkipRecord, match="caption_no_tokens in field 'captions\\[1\\]'"):
    checks.check_record(_region([(good, ["x"], [])], ("ok", "\x07")), tokenizer, cfg)


def test_check_record_image_and_video(tokenizer):
  cfg = F.PreprocConfig()
  world = synthetic.ShapesWorld()
  img, vid = world.record(F.IMAGE, 1), world.record(F.VIDEO, 1)
  checks.check_record(img, tokenizer, cfg)
  checks.check_record(vid, tokenizer, cfg)
  for record, change, reason in [
    (img, {"captions": ["fine", "-- / --"]}, "empty_caption"),
    (img, {"captions": []}, "empty_caption"),
    (img, {"image": img["image"][:-30]}, "corrupt_image"),
    (vid, {"clips": [vid["clips"][0], []]}, "empty_video"),
    (vid, {"clips": [[vid["clips"][0][0], b"junk"]]}, "corrupt_image"),
  ]:
    with pytest.raises(SkipRecord) as e:
      checks.check_record({**record, **change}, tokenizer, cfg)
    assert e.value.reason == reason


def test_fault_injector_rejects_bad_use(tmp_path, world):
  synthetic.write_jsonl(world, F.IMAGE, 4, tmp_path / "c", n_files=1)
  with pytest.raises(FileExistsError):
    faults.inject_faults(tmp_path / "c", tmp_path / "c", F.IMAGE)
  with pytest.raises(NotADirectoryError):
    faults.inject_faults(tmp_path / "c" / "part-00000.jsonl", tmp_path / "d", F.IMAGE)
  assert "missing_image" not in faults.applicable_reasons(F.VIDEO)
  assert base64.b64decode(
    json.loads(open(tmp_path / "c" / "part-00000.jsonl").readline())["binary"]
  )
