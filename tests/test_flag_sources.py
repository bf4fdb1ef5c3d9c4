"""Source lists and evaluators set from flags (configs/source_spec.py): the spec grammar, its
errors, and every documented command that sets data or evaluators from flags, parsed by
config_flags exactly as train.py / eval.py parse it and turned into the typed settings."""

import pathlib
import re
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from configs.source_spec import parse_sources
from x2vlm_jax import run_config as rc

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _parse(argv: list[str]):
  """The config as `train.py` would get it from `argv` (its --config and --config.* flags)."""
  fv = flags.FlagValues()
  known = ["prog", *(a for a in argv if a.startswith("--config"))]
  holder = config_flags.DEFINE_config_file(
    "config", None, "", flag_values=fv, lock_config=True, sys_argv=known
  )
  fv(known)
  return holder.value


def _doc_commands() -> list[tuple[str, list[str]]]:
  """(file, argv) of every documented train.py / eval.py command that sets sources/evaluators."""
  out = []
  for doc in DOCS:
    text = re.sub(r"\\\n\s*", " ", doc.read_text())  # join continued lines
    for line in text.splitlines():
      line = line.split(" # ")[0].strip()
      if re.match(r"python (train|eval)\.py", line) and re.search(r"--config\.(data|eval)\.", line):
        out.append((doc.name, shlex.split(line)[2:]))
  return out


def test_compact_spec_and_json():
  assert parse_sources("jsonl:/d/coco@2,jsonl:gs://b/vg;image_root=/img;language=en") == [
    {"type": "jsonl", "path": "/d/coco", "weight": 2.0},
    {"type": "jsonl", "path": "gs://b/vg", "image_root": "/img", "language": "en"},
  ]
  assert parse_sources("synthetic:64@0.5;seed=3") == [
    {"type": "synthetic", "size": 64, "weight": 0.5, "seed": 3}
  ]
  assert parse_sources('[{"type": "json", "path": "/t.json"}]') == [
    {"type": "json", "path": "/t.json"}
  ]
  assert parse_sources("") == []


@pytest.mark.parametrize(
  "spec, message",
  [
    ("coco:/d/x", "TYPE one of"),
    ("/d/x", "TYPE:PATH"),
    ("jsonl:/d/x@heavy", "weight 'heavy'"),
    ("jsonl:/d/x;root=/i", "'root=/i' is not KEY=VALUE with a jsonl key"),
    ('[{"path": "/x"}]', "objects with a 'type'"),
  ],
)
def test_bad_specs_are_named(spec, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    parse_sources(spec)


def test_docs_commands_parse_into_sources_and_evaluators():
  commands = _doc_commands()
  assert len(commands) >= 4, commands  # training.md's three, evaluation.md's eval.py one
  for doc, argv in commands:
    cfg = _parse(argv)
    streams = rc.streams_config(cfg)
    evals = rc.eval_config(cfg.eval)
    for arg in argv:
      m = re.match(r"--config\.data\.(\w+)=", arg)
      if m:
        assert streams.sources[m.group(1)] == tuple(cfg.data[m.group(1)]), (doc, arg)
      m = re.match(r"--config\.eval\.(\w+)\.data=", arg)
      if m:
        assert m.group(1) in evals.names, (doc, arg)


def test_flags_reach_the_typed_settings():
  cfg = _parse(
    [
      "--config=configs/tiny.py",
      "--config.data.image=synthetic:512@1;seed=5,jsonl:/d/coco@0.25",
      "--config.eval.evaluators=retrieval,grounding",
      "--config.eval.retrieval.data=synthetic:20;seed=99",
      "--config.eval.retrieval.k_test=4",
      "--config.eval.grounding.data=jsonl:gs://bucket/refs",
    ]
  )
  streams = rc.streams_config(cfg)
  assert streams.sources["image"] == (
    {"type": "synthetic", "size": 512, "weight": 1.0, "seed": 5},
    {"type": "jsonl", "path": "/d/coco", "weight": 0.25},
  )
  evals = rc.eval_config(cfg.eval)
  assert evals.names == ("retrieval", "grounding") and evals.retrieval.k_test == 4
  assert evals.retrieval.data == (("", ({"type": "synthetic", "size": 20, "seed": 99},)),)
  assert evals.grounding.data[0][1][0]["path"] == "gs://bucket/refs"
