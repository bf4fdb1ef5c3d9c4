"""MVPTR VQA / SNLI-VE data (`data_pipelines/mvptr_task_sources.py`): the official run_vqa.py /
run_ve.py files written by the shapes-world writer are read back exactly, rows carry the tags
appended to the text (segment 1) where the spec says `use_b_text`, and bad records are skipped,
counted and named (record and field). No model: fast."""

import json
import os
import pickle

import numpy as np
import pytest

from data_pipelines import features as F
from data_pipelines import mvptr_finetune_examples as FE
from data_pipelines import mvptr_stream, mvptr_synthetic_qa
from data_pipelines import synthetic as S
from data_pipelines.mvptr_examples import MvptrExampleSpec
from data_pipelines.mvptr_task_sources import TaskSource, read_answers, read_task_spec

SPEC = MvptrExampleSpec(max_tokens=20, max_phrases=4, max_tags=6, max_regions=4, vocab_size=30614)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
  return mvptr_synthetic_qa.write_splits(str(tmp_path_factory.mktemp("mvqa_src")), 6, 2)


def _append(spec_path, key, entries, sg):
  """Appends raw entries (and their sg entries) to the files a spec names."""
  s = read_task_spec(spec_path)
  if s["task"] == "vqa":
    with open(s["questions"]) as f:
      data = json.load(f)
    with open(s["questions"], "w") as f:
      json.dump(data + entries, f)
  else:
    with open(s[key], "a") as f:
      f.writelines(line + "\n" for line in entries)
  with open(s["sg_file"]) as f:
    old = json.load(f)
  with open(s["sg_file"], "w") as f:
    json.dump(old + sg, f)


def test_vqa_records_are_the_worlds_answers(specs):
  src = TaskSource(specs["vqa"]["train"], vocab_size=SPEC.vocab_size)
  assert src.answers == list(mvptr_synthetic_qa.ANSWERS) and src.use_b_text
  world = S.ShapesWorld(seed=S.TRAIN_SEED)
  with open(read_task_spec(specs["vqa"]["train"])["questions"]) as f:
    qla = json.load(f)
  assert len(src) == len(qla) > 6 * 5
  for i in range(len(src)):
    r = src[i]
    shapes = world.scene(int(qla[i]["img_id"]), F.IMAGE)[1]
    q = qla[i]["q"]
    want = dict(mvptr_synthetic_qa.questions(shapes, 64, np.random.default_rng(0))).get(q)
    if q.startswith("how many") or "color" in q:  # the questions that use no random draw
      assert src.answers[int(np.argmax(r["answer_scores"]))] == want, q
    assert r["answer_scores"].sum() == 1 and r["regions"].shape == (len(shapes), 2054)
  row = FE.task_row(None, src[0], SPEC)
  n_tags = src[0]["tags"].size
  assert row["text_type_ids"].sum() == n_tags > 0  # tags after [SEP], segment 1
  sep = int(np.flatnonzero(row["text_ids"] == SPEC.sep_id)[0])
  np.testing.assert_array_equal(row["text_ids"][sep + 1 : sep + 1 + n_tags], src[0]["tags"])
  assert row["text_mask"].sum() == sep + 1 + n_tags


def test_ve_records_labels_and_phrases(specs):
  src = TaskSource(specs["ve"]["train"], vocab_size=SPEC.vocab_size)
  labels = [int(src[i]["ve_label"]) for i in range(len(src))]
  assert len(src) == 6 * 3 and np.bincount(labels).tolist() == [6, 6, 6]
  r = src[0]  # 'there is a <colour> <shape>': (shape,) as its word id, (shape, colour) >= 30522
  assert r["phrases"].size == 2 and r["phrases"][1] >= 30522 and r["text_tags"].size == 0
  row = FE.task_row(None, r, SPEC)
  assert row["text_type_ids"].sum() == 0 and row["ve_label"] == 2  # entailment first


def test_bad_records_are_skipped_counted_and_named(specs, tmp_path):
  import shutil

  root = tmp_path / "copy"
  shutil.copytree(os.path.dirname(specs["vqa"]["train"]), root)
  vqa, ve = str(root / "vqa.json"), str(root / "ve.json")
  good = TaskSource(vqa)
  n = len(good)
  bad_q = [
    {"q": "what?", "an": [99], "s": [1.0], "img_id": 0},  # label outside the 25 answers
    {"q": "what?", "an": [1], "s": [1.0]},  # no img_id
    {"q": "what?", "an": [], "s": [], "img_id": 0},  # no answer in the vocabulary: left out
    {"q": "what?", "an": [1], "s": [1.0], "img_id": 12345},  # no such image
  ]
  _append(vqa, "questions", bad_q, [[[], "x"]] * 4)
  src = TaskSource(vqa)
  assert len(src) == n + 3 and src.excluded == {"no_answer": 1}
  with pytest.raises(F.SkipRecord, match=r"qla.json:\d+: bad_field_type in field 'an'.*99"):
    src[n]
  rows, skips = mvptr_stream.heldout_arrays(src, SPEC, build=FE.task_row)
  assert rows["answer_scores"].shape == (n, 25)
  assert skips == {"bad_field_type": 2, "missing_image": 1}
  from data_pipelines.tools import validate

  assert validate.main([vqa, "--mvptr-task", "--quiet"]) == validate.EXIT_BAD_RECORDS
  report = validate.validate_source(src, check=False)
  assert report.counts == {"bad_field_type": 2, "missing_image": 1}
  assert str(report.problems[0]).startswith(f"{read_task_spec(vqa)['questions']}:{n + 1}: ")
  _append(
    ve,
    "pairs",
    [
      "not json",
      json.dumps({"Flickr30K_ID": "0", "sentence2": "a", "gold_label": "maybe", "pairID": "p"}),
    ],
    [[[], "q"], [[], "p"]],
  )
  src = TaskSource(ve)
  with pytest.raises(F.SkipRecord, match=r"snli_ve.jsonl:20: bad_field_type in field 'gold_label'"):
    src[19]
  it = mvptr_stream.pretrain_iterator(src, SPEC, 4, 0, 0, 1, num_epochs=1, build=FE.task_row)
  batches = list(it)
  assert sum(b["ve_label"].shape[0] for b in batches) == 16  # 18 good rows, 4 a batch
  assert it.skip_counts() == {"bad_json": 1, "bad_field_type": 1}


def test_spec_and_label_file_errors(specs, tmp_path):
  spec = tmp_path / "bad.json"
  spec.write_text(json.dumps({"task": "vqa", "questions": "q.json"}))
  with pytest.raises(ValueError, match=r"lacks \['sg_file', 'label_file', 'img_feat_dir'\]"):
    read_task_spec(str(spec))
  evil = tmp_path / "ans2label.pkl"
  evil.write_bytes(pickle.dumps({"yes": np.int64(0)}))  # a numpy object, not plain data
  with pytest.raises(ValueError, match="not a plain answer dict"):
    read_answers(str(evil))
  gaps = tmp_path / "gaps.json"
  gaps.write_text(json.dumps({"yes": 0, "no": 2}))
  with pytest.raises(ValueError, match="labels must be 0..1"):
    read_answers(str(gaps))


def test_a_vqa_test_split_keeps_unanswered_questions_with_their_ids(specs, tmp_path):
  """test-dev / test-std: no answers, every question kept, its q_id for the result file."""
  s = read_task_spec(specs["vqa"]["heldout"])
  with open(s["questions"]) as f:
    qla = json.load(f)
  for e in qla:
    del e["an"], e["s"]
  qla[1].pop("q_id")  # a test question without an id: skipped, named
  (tmp_path / "qla.json").write_text(json.dumps(qla))
  spec = {"task": "vqa", "test": True, "questions": str(tmp_path / "qla.json")}
  spec |= {k: s[k] for k in ("sg_file", "label_file", "img_feat_dir")}
  (tmp_path / "test.json").write_text(json.dumps(spec))
  src = TaskSource(str(tmp_path / "test.json"), vocab_size=SPEC.vocab_size)
  assert len(src) == len(qla) and src.excluded == {}
  assert [src.question_id(i) for i in range(len(src))] == [e.get("q_id", -1) for e in qla]
  assert not src[0]["answer_scores"].any()
  with pytest.raises(F.SkipRecord, match="q_id"):
    src[1]
  rows, skips = mvptr_stream.heldout_arrays(src, SPEC, build=FE.task_row)
  assert skips == {"bad_field_type": 1} and len(rows["index"]) == len(qla) - 1
  ve = dict(read_task_spec(specs["ve"]["heldout"]), test=True)
  (tmp_path / "ve.json").write_text(json.dumps(ve))
  with pytest.raises(ValueError, match="'test'"):
    read_task_spec(str(tmp_path / "ve.json"))
