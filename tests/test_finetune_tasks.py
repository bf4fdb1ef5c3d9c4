"""Every fine-tuning task end to end through the one training loop (`train_lib`), on the tiny
model and the synthetic task sets written in the official formats (`synthetic_tasks`): the loss
falls over a few steps, evaluation reports the documented metric names, the best parameters are
kept, and a stopped-and-resumed run is bit-identical to an uninterrupted one.

Runs in this process (no subprocess start-up); the runs share a persistent compilation cache so
the resumed run re-uses the compiled step.
"""

import json
import pathlib

import numpy as np
import pytest

from configs.finetune import tiny
from data_pipelines import synthetic_tasks
from x2vlm_jax import train_lib

METRICS = {  # documented metric names per task (docs/finetuning.md)
  "retrieval": [
    "eval/retrieval/val/img_r1",
    "eval/retrieval/val/txt_r1",
    "eval/retrieval/val/r_mean",
  ],
  "video_retrieval": ["eval/retrieval/test/img_r1", "eval/retrieval/test/r_mean"],
  "grounding": ["eval/grounding/val/acc", "eval/grounding/testA/acc"],
}
LOSSES = {
  "retrieval": ["train/loss/itc/image", "train/loss/itm/image"],
  "video_retrieval": ["train/loss/itc/video", "train/loss/itm/video"],
  "grounding": ["train/loss/box_l1/region", "train/loss/box_giou/region"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("ft_data")
  synthetic_tasks.write_retrieval(d / "retrieval", n_train=48, n_val=8, n_test=8)
  synthetic_tasks.write_grounding(d / "grounding", n_train=24, n_val=6, n_testA=4, n_testB=4)
  synthetic_tasks.write_video_retrieval(d / "video_retrieval", n_train=24, n_test=6)
  return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("ft_cache"))


def _config(task, data, cache, **train):
  c = tiny.get_config(f"task={task},data={data}")
  c.train.compilation_cache_dir = cache
  for k, v in train.items():
    c.train[k] = v
  return c


def _metrics(workdir: pathlib.Path) -> dict[int, dict]:
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    # Wall-clock figures (eval `.../seconds`) differ between any two runs; everything else is
    # a function of the data, the seeds and the step.
    kept = {k: v for k, v in rec["metrics"].items() if not k.endswith("/seconds")}
    out.setdefault(rec["step"], {}).update(kept)
  return out


@pytest.fixture(scope="module")
def runs(data, cache, tmp_path_factory):
  """Each task trained once to step 12 (evaluated at the end)."""
  out = {}
  for task in ("retrieval", "video_retrieval", "grounding"):
    workdir = tmp_path_factory.mktemp(task)
    result = train_lib.train_and_evaluate(_config(task, data, cache), workdir)
    out[task] = (result, workdir)
  return out


@pytest.mark.parametrize("task", ["retrieval", "video_retrieval", "grounding"])
def test_task_trains_evaluates_and_keeps_the_best(task, runs):
  result, workdir = runs[task]
  assert result.status == "done" and result.step == 12
  m = _metrics(workdir)
  for name in LOSSES[task]:
    first = np.mean([m[s][name] for s in (1, 2, 3)])
    last = np.mean([m[s][name] for s in (10, 11, 12)])
    print(f"{task} {name}: {first:.4f} -> {last:.4f}")
    assert last < first, (name, first, last)
  for name in METRICS[task]:
    assert name in m[12], sorted(m[12])
  best = json.loads((workdir / "best" / "best.json").read_text())
  assert best["step"] == 12 and (workdir / "best" / best["dir"] / "model_config.json").exists()


def test_stopped_and_resumed_run_is_identical(runs, data, cache, tmp_path):
  """stop_after=7 (saves step 7), then a restart to step 12 == the uninterrupted run."""
  stopped = train_lib.train_and_evaluate(_config("retrieval", data, cache, stop_after=7), tmp_path)
  assert stopped.status == "stopped" and stopped.step == 7
  train_lib.train_and_evaluate(_config("retrieval", data, cache), tmp_path)
  a, b = _metrics(runs["retrieval"][1]), _metrics(tmp_path)
  assert sorted(a) == sorted(b) == list(range(1, 13))
  for step in a:
    assert a[step] == b[step], step  # every logged number (training and evaluation), bit for bit
