"""Errors a person can read: a config typo is one line and exit 2 (train.py, as a process), eval.py
without an evaluator says what to set and exits 2, the validator's exit codes are distinct, and
convert_jsonl's stdout is its JSON summary only."""

import json
import os
import subprocess
import sys

import pytest

from data_pipelines import features as F
from data_pipelines import synthetic
from data_pipelines.tools import convert_jsonl, validate
from x2vlm_jax import cli
from x2vlm_jax.run_config import batch_sizes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=300
  )


def test_config_typo_is_one_line_exit_2(tmp_path):
  proc = _run(
    "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.optim.lrr=1"
  )
  assert proc.returncode == cli.USAGE_ERROR
  lines = proc.stderr.strip().splitlines()
  assert lines == [
    'train.py: --config.optim.lrr=1: unknown field \'lrr\'; Did you mean "lr" instead of "lrr"?'
  ]
  assert not list(tmp_path.iterdir())  # nothing started


def test_eval_without_evaluators_exits_2_naming_what_to_set():
  proc = _run("eval.py", "--config=configs/tiny.py", "--checkpoint=/nonexistent")
  assert proc.returncode == 2 and proc.stdout == ""
  assert "runs no evaluator" in proc.stderr and "--config.eval.evaluators=" in proc.stderr


@pytest.mark.parametrize(
  "error, line",
  [
    (AttributeError('\'lrr\'\nDid you mean "lr" instead of "lrr"?'), "unknown field 'lrr'"),
    (ValueError("first\nsecond"), "first; second"),
  ],
)
def test_one_line(error, line):
  assert line in cli.one_line(error) and "\n" not in cli.one_line(error)


def test_validator_exit_codes(tmp_path, capsys):
  world = synthetic.ShapesWorld(synthetic.WorldConfig(image_size=32))
  synthetic.write_jsonl(world, F.IMAGE, 4, tmp_path / "good", n_files=1)
  assert validate.main([str(tmp_path / "good"), "--kind", F.IMAGE]) == validate.EXIT_OK
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"image": "missing.png", "caption": "a red square"}\n')
  assert validate.main([str(bad), "--kind", F.IMAGE]) == validate.EXIT_BAD_RECORDS
  capsys.readouterr()
  assert validate.main([str(tmp_path / "nowhere.jsonl")]) == validate.EXIT_UNREADABLE
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"validate: {tmp_path / 'nowhere.jsonl'}: ")
  with pytest.raises(SystemExit) as e:
    validate.main(["--no-such-option"])
  assert e.value.code == validate.EXIT_USAGE
  assert len({validate.EXIT_OK, validate.EXIT_BAD_RECORDS, validate.EXIT_USAGE, 3}) == 4


def test_convert_stdout_is_json_only(tmp_path, capfd):
  world = synthetic.ShapesWorld(synthetic.WorldConfig(image_size=32))
  synthetic.write_jsonl(world, F.IMAGE, 4, tmp_path / "src", n_files=1)
  capfd.readouterr()
  assert convert_jsonl.main(["--kind", F.IMAGE, str(tmp_path / "src"), str(tmp_path / "out")]) == 0
  out = capfd.readouterr().out
  assert json.loads(out)["written"] == 4  # the whole of stdout is one JSON document


def test_accumulation_error_names_the_global_and_the_micro_batch():
  from configs import tiny

  c = tiny.get_config()
  c.batch.image = 12
  with pytest.raises(ValueError) as e:
    from x2vlm_jax.models.config import ModelConfig

    batch_sizes(c, ModelConfig.tiny(), _Mesh(), 1, accum_steps=3)
  msg = str(e.value)
  assert "config.batch.image = 12 (global, per update) gives 4 per micro-batch" in msg
  assert "8 batch shards" in msg


class _Mesh:
  shape = {"data": 8, "fsdp": 1, "tensor": 1}


def test_orbax_noise_filtered_its_real_warnings_kept():
  """eval.py / train.py console: orbax INFO lines and its read-only notice are dropped."""
  import logging

  from x2vlm_jax.run_env import QuietOrbax

  quiet, orbax = QuietOrbax(), os.path.join(os.sep, "x", "orbax", "checkpoint", "manager.py")
  rec = lambda level, msg, path: logging.LogRecord("absl", level, path, 1, msg, (), None)
  assert not quiet.filter(rec(logging.INFO, "Saving item", orbax))
  assert not quiet.filter(rec(logging.WARNING, "Given directory is read only=%s", orbax))
  assert quiet.filter(rec(logging.WARNING, "could not delete", orbax))
  assert quiet.filter(rec(logging.INFO, "step 10/100", os.path.join(os.sep, "x", "train.py")))
