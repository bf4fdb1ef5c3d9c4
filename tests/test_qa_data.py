"""Readers of the official VQA / NLVR2 / video-QA files, the task examples and batch fields
(data_pipelines/task_sources.py, task_examples.py, features.task_spec)."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines import features as F
from data_pipelines import source_specs, task_examples, task_sources
from data_pipelines.examples import make_example
from data_pipelines.text_ops import Tokenizer
from x2vlm_jax import assets


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(str(assets.minilm_dir()), 16)


def _png(tmp_path, name, colour=(200, 30, 30)):
  path = tmp_path / name
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", (32, 24), colour).save(path)
  return path


def test_answer_weights_as_official():
  assert task_sources.answer_weights(["a", "b", "a", "a"], "vqa") == (["a", "b"], [0.75, 0.25])
  assert task_sources.answer_weights("tree", "vg") == (["tree"], [0.5])
  assert task_sources.answer_weights(None, None) == ([], [])


def test_vqa_reader_roots_and_ids(tmp_path):
  _png(tmp_path, "coco/x.png")
  _png(tmp_path, "vg/y.png")
  entries = [
    {"question_id": 7, "image": "x.png", "question": "What?", "answer": ["a"] * 9 + ["b"]},
    {"question_id": 8, "image": "y.png", "question": "Where?", "answer": "left", "dataset": "vg"},
    {"question_id": 9, "image": "x.png", "question": "Test?"},
    {"question_id": 10, "image": "missing.png", "question": "?"},
  ]
  (tmp_path / "vqa.json").write_text(json.dumps(entries))
  spec = {"type": "vqa", "path": str(tmp_path / "vqa.json"), "image_root": str(tmp_path / "coco")}
  src = source_specs.build_source(F.IMAGE, {**spec, "vg_root": str(tmp_path / "vg")})
  a, b, c = src[0], src[1], src[2]
  assert a["id"] == "7" and a["answers"] == ["a", "b"] and a["answer_weights"] == [0.9, 0.1]
  assert a["annotator_answers"] == ["a"] * 9 + ["b"]
  assert b["answer_weights"] == [0.5] and c["answers"] == [] and c["annotator_answers"] == []
  with pytest.raises(F.SkipRecord, match="missing_image"):
    src[3]
  with pytest.raises(ValueError, match="listed under 'video'"):
    source_specs.build_source(F.VIDEO, spec)


def test_nlvr2_and_video_qa_readers(tmp_path):
  _png(tmp_path, "l.png")
  _png(tmp_path, "r.png", (0, 0, 255))
  rows = [
    {"images": ["l.png", "r.png"], "sentence": "Two dogs.", "label": "True"},
    {"images": ["l.png", "r.png"], "sentence": "x", "label": False},
    {"images": ["l.png", "r.png"], "sentence": "x", "label": "maybe"},
  ]
  (tmp_path / "nlvr.json").write_text(json.dumps(rows))
  src = task_sources.Nlvr2Source(tmp_path / "nlvr.json", str(tmp_path))
  assert src[0]["label"] == 1 and src[1]["label"] == 0 and src[0]["pair_image"] != src[0]["image"]
  with pytest.raises(F.SkipRecord, match="bad_field_type"):
    src[2]
  frames = [base64.b64encode((tmp_path / "l.png").read_bytes()).decode()] * 3
  (tmp_path / "frames").mkdir()
  (tmp_path / "frames" / "video_12.json").write_text(json.dumps(frames))
  lines = [
    {"video_id": "video12", "question": "what?", "answer": "dog"},
    {"video_id": "video12", "question": "what?", "answer": "zebra"},
  ]
  (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  (tmp_path / "a2l.json").write_text(json.dumps({"dog": 0, "cat": 1}))
  src = task_sources.VideoQaSource(
    tmp_path / "qa.jsonl", tmp_path / "a2l.json", tmp_path / "frames"
  )
  assert src[0]["label"] == 0 and src[1]["label"] == F.IGNORE_LABEL and len(src[0]["clips"][0]) == 3
  assert task_sources.frames_file("video7", "msrvtt") == "video_7.json"
  assert task_sources.frames_file("abc_1", "msvd") == "abc_1.json"


def test_pre_question_and_careful_flip():
  assert task_examples.pre_question("What's on the T-shirt?", 30) == "what s on the t shirt"
  assert task_examples.pre_question("a, b c d", 3) == "a  b"  # the empty word counts
  assert task_examples.left_or_right("is it red?", ["the left one"])
  assert not task_examples.left_or_right("is it red?", ["yes"])


def test_vqa_example_keeps_the_heaviest_answers(tok, tmp_path):
  data = io.BytesIO()
  Image.new("RGB", (40, 30), (10, 200, 10)).save(data, format="PNG")
  record = {
    "kind": F.IMAGE,
    "id": "q",
    "image": data.getvalue(),
    "captions": ["What color?"],
    "answers": ["green", "light green", "lime"],
    "answer_weights": [0.3, 0.6, 0.1],
  }
  cfg = F.PreprocConfig(
    image_res=32, max_tokens=16, task_fields=F.VQA, max_answers=2, answer_tokens=5
  )
  ex = make_example(F.IMAGE, record, np.random.default_rng(0), cfg, tok)
  np.testing.assert_allclose(ex[F.ANSWER_WEIGHTS], [0.6, 0.3])
  ids, mask = task_examples.answer_layout(tok, "light green", 5)
  np.testing.assert_array_equal(ex[F.ANSWER_IDS][0], ids)
  assert ids[0] == tok.cls_id and ids[mask.sum() - 1] == tok.sep_id
  assert task_examples.answer_layout(tok, "", 4)[1].tolist() == [1, 1, 0, 0]  # [CLS] [SEP]
  assert ex[F.MLM_WEIGHTS].sum() == 0 and (ex[F.MLM_IDS] == ex[F.TEXT_IDS]).all()


def test_task_fields_extend_one_kind_only():
  plain = F.BatchSizes(image_res=32, image_batch=4, video_batch=2)
  assert set(F.batch_spec(plain)[F.IMAGE]) == set(
    F.batch_spec(F.BatchSizes(image_res=32, image_batch=4))[F.IMAGE]
  )
  vqa = F.batch_spec(
    F.BatchSizes(image_res=32, image_batch=4, task_fields=F.VQA, max_answers=3, answer_tokens=6)
  )
  assert vqa[F.IMAGE][F.ANSWER_IDS] == ((4, 3, 6), np.int32)
  nlvr = F.batch_spec(F.BatchSizes(image_res=32, image_batch=4, task_fields=F.NLVR2))
  assert nlvr[F.IMAGE][F.PAIR_PIXELS] == ((4, 32, 32, 3), np.uint8)
  video = F.batch_spec(F.BatchSizes(image_res=32, video_batch=2, task_fields=F.VIDEO_QA))
  assert video[F.VIDEO][F.LABEL] == ((2,), np.int32)
  with pytest.raises(ValueError, match="task_fields"):
    F.batch_spec(F.BatchSizes(image_batch=1, task_fields="snli_ve"))
