"""The VQA demo on real data, end to end on a CPU: the easy-VQA set (`easy-vqa` package) in the
official VQA format, the answer decoder fine-tuned and evaluated with the official ranking and
VQA accuracy (docs/finetuning.md#the-easy-vqa-demo).

  python -m x2vlm_jax.vqa_demo [--workdir=/tmp/x2vlm_vqa_demo] [--ci]

1. Converts the package's data (`python -m data_pipelines.tools.easy_vqa`) under <workdir>/data.
2. Trains `configs/finetune/vqa_easy.py:data=...` with `train.py`, which evaluates val and
   test at the end (the official result JSON under <workdir>/run/results_<step>/).
3. Prints the accuracy against the majority baseline and the wall time of each stage; writes
   them to <workdir>/summary.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

from x2vlm_jax import demo

REPO = demo.REPO
CONFIG = REPO / "configs" / "finetune" / "vqa_easy.py"


def _read_metrics(metrics_jsonl: pathlib.Path) -> dict:
  """The last evaluation's metrics and the first / last logged VQA loss of a run."""
  metrics, losses = {}, []
  for line in metrics_jsonl.read_text().splitlines():
    values = json.loads(line)["metrics"]
    metrics.update({k: v for k, v in values.items() if k.startswith("eval/")})
    if "train/loss/vqa/image" in values:
      losses.append(values["train/loss/vqa/image"])
  return {"metrics": metrics, "loss_first_last": [losses[0], losses[-1]] if losses else []}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/x2vlm_vqa_demo")
  parser.add_argument("--ci", action="store_true", help="the short CI variant")
  args = parser.parse_args(argv)
  work = pathlib.Path(args.workdir).absolute()
  if work.exists():
    shutil.rmtree(work)
  work.mkdir(parents=True)
  times, t0 = {}, time.time()
  sys.path.insert(0, str(REPO))
  from data_pipelines.tools import easy_vqa  # pylint: disable=g-import-not-at-top

  counts = easy_vqa.convert(work / "data", max_train_images=700 if args.ci else 0)
  times["data"] = time.time() - t0
  config = f"{CONFIG}:data={work / 'data'}" + (",ci" if args.ci else "")
  t0, run = time.time(), work / "run"
  train = [sys.executable, "train.py", f"--config={config}", f"--workdir={run}"]
  demo.run_stage(
    train + [f"--config.train.compilation_cache_dir={work / 'jax_cache'}"], work / "train.log"
  )
  times["fine_tune"] = time.time() - t0
  summary = {"questions": counts, "seconds": times, **_read_metrics(run / "metrics.jsonl")}
  (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  m = summary["metrics"]
  for split in ("val", "test"):
    key = f"eval/vqa/{split}/acc"
    if key in m:
      print(f"easy-VQA {split}: accuracy {m[key]:.1f} (majority {m[key + '_majority']:.1f})")
  print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
  return summary


if __name__ == "__main__":
  main()
