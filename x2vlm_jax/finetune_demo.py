"""The fine-tuning demo, end to end on a CPU: the pre-training demo's model fine-tuned on synthetic
retrieval and grounding (and, with `--tasks=caption`, captioning), against its zero-shot self
(`make finetune-demo`).

  python -m x2vlm_jax.finetune_demo [--pretrained=RUN] [--workdir=/tmp/x2vlm_finetune_demo] [--ci]

1. The pre-trained model: `--pretrained` (a `python -m x2vlm_jax.demo` run directory), else
   /tmp/x2vlm_demo/run when it holds a checkpoint, else the pre-training demo is run first (into
   <workdir>/pretrain).
2. Writes the shapes world's fine-tuning sets in the official formats under <workdir>/data
   (`data_pipelines/synthetic_tasks.py`): retrieval (train / val / test, disjoint scenes) and
   RefCOCO+-style grounding (train / val / testA / testB).
3. For each task: evaluates the pre-trained model zero-shot with `eval.py`, fine-tunes it with
   `train.py --config=configs/finetune/demo.py:task=...` (init.checkpoint = the pre-trained
   run), which evaluates the fine-tuned model on the same held-out splits at its last step
   (the grounding boxes: <workdir>/<task>_run/grounding_<step>_<split>.png).
4. Prints zero-shot vs fine-tuned numbers and the wall time of each stage; writes them to
   <workdir>/summary.json.
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
CONFIG = REPO / "configs" / "finetune" / "demo.py"
DEFAULT_PRETRAINED = pathlib.Path("/tmp/x2vlm_demo/run")
HEADLINE = {  # task -> (metric on the test splits, label)
  "retrieval": [
    ("eval/retrieval/test/img_r1", "text->image R@1"),
    ("eval/retrieval/test/txt_r1", "image->text R@1"),
    ("eval/retrieval/test/r_mean", "mean recall"),
  ],
  "grounding": [
    ("eval/grounding/testA/acc", "accuracy testA"),
    ("eval/grounding/testB/acc", "accuracy testB"),
    ("eval/grounding/val/acc", "accuracy val"),
  ],
  "caption": [
    ("eval/caption/test/bleu_4", "BLEU-4 test"),
    ("eval/caption/test/cider", "CIDEr test"),
    ("eval/caption/val/cider", "CIDEr val"),
  ],
}
SHOWN_CAPTIONS = 5  # fine-tuned captions printed next to their references


def write_data(data_dir: pathlib.Path, ci: bool, tasks=("retrieval", "grounding")) -> None:
  """The synthetic retrieval and grounding sets at the demo model's resolution."""
  sys.path.insert(0, str(REPO))
  from configs.finetune import demo as cfg  # pylint: disable=g-import-not-at-top
  from data_pipelines import synthetic_tasks  # pylint: disable=g-import-not-at-top

  sizes = cfg.CI_SIZES if ci else cfg.SIZES
  writers = {
    "retrieval": synthetic_tasks.write_retrieval,
    "grounding": synthetic_tasks.write_grounding,
    "caption": synthetic_tasks.write_retrieval,  # Karpathy format: the captioning files too
  }
  for task in tasks:
    writers[task](data_dir / task, image_size=128, world=cfg.WORLD, **sizes[task])


def _pretrained(args, work: pathlib.Path) -> pathlib.Path:
  if args.pretrained:
    return pathlib.Path(args.pretrained).absolute()
  if not args.ci and (DEFAULT_PRETRAINED / "checkpoints").is_dir():
    return DEFAULT_PRETRAINED
  print("no pre-trained demo run given: running the pre-training demo first", flush=True)
  demo.main(["--workdir", str(work / "pretrain")] + (["--ci"] if args.ci else []))
  return work / "pretrain" / "run"


def _evaluate(config: str, checkpoint: pathlib.Path, out: pathlib.Path) -> dict:
  demo.run_stage(
    [
      sys.executable,
      "eval.py",
      f"--config={config}",
      f"--checkpoint={checkpoint}",
      f"--output={out}.json",
      f"--png={out}.png",
      f"--results={out}_results",
    ],
    out.with_suffix(".log"),
  )
  return json.loads(out.with_suffix(".json").read_text())


def run_task(
  task: str, data: pathlib.Path, pretrained: pathlib.Path, work: pathlib.Path, ci: bool
) -> dict:
  """Zero-shot evaluation, fine-tuning and fine-tuned evaluation of one task."""
  config = f"{CONFIG}:task={task},data={data}" + (",ci" if ci else "")
  times = {}
  t0 = time.time()
  zero = _evaluate(config, pretrained, work / f"{task}_zero_shot")
  times["zero_shot_eval"] = time.time() - t0
  t0 = time.time()
  run = work / f"{task}_run"
  demo.run_stage(
    [
      sys.executable,
      "train.py",
      f"--config={config}",
      f"--workdir={run}",
      f"--config.init.checkpoint={pretrained}",
      f"--config.train.compilation_cache_dir={work / 'jax_cache'}",
    ],
    work / f"{task}_train.log",
  )
  times["fine_tune"] = time.time() - t0
  step, tuned = final_evaluation(run / "metrics.jsonl")
  if task == "caption":
    show_captions(data / task, run / f"results_{step}")
  return {
    "zero_shot": zero,
    "fine_tuned": tuned,
    "seconds": times,
    "losses": demo.read_losses(run / "metrics.jsonl"),
  }


def final_evaluation(metrics_jsonl: pathlib.Path) -> tuple[int, dict]:
  """(step, metrics) of the fine-tuning run's last evaluation: the loop evaluates the final
  parameters on the held-out splits at its last step (eval_every divides total_steps), so
  running eval.py on the final checkpoint again would only repeat that work."""
  last, final_step = None, -1
  with open(metrics_jsonl) as f:
    for line in f:
      record = json.loads(line)
      final_step = max(final_step, record["step"])
      if any(k.startswith("eval/") for k in record["metrics"]):
        last = record
  if last is None or last["step"] != final_step:
    raise RuntimeError(f"{metrics_jsonl}: no evaluation logged at the last step {final_step}")
  return last["step"], last["metrics"]


def show_captions(data: pathlib.Path, results: pathlib.Path) -> None:
  """Prints the first fine-tuned test captions next to the references of their images."""
  from x2vlm_jax.evaluators.caption_metric import image_id_from_path  # pylint: disable=g-import-not-at-top

  refs = json.loads((data / "retrieval_test.json").read_text())
  got = {
    r["image_id"]: r["caption"]
    for r in json.loads((results / "caption_result_test.json").read_text())
  }
  print("fine-tuned captions on held-out images (test split):")
  for entry in refs[:SHOWN_CAPTIONS]:
    print(f"  {entry['image']}: {got.get(image_id_from_path(entry['image']))!r}")
    for r in entry["caption"][:2]:
      print(f"      reference: {r!r}")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/x2vlm_finetune_demo")
  parser.add_argument("--pretrained", default="", help="a pre-training demo run directory")
  parser.add_argument("--ci", action="store_true", help="the short CI variant")
  parser.add_argument(
    "--tasks", default="retrieval,grounding", help="comma-separated, of retrieval,grounding,caption"
  )
  args = parser.parse_args(argv)
  chosen = [t for t in args.tasks.split(",") if t]
  unknown = set(chosen) - set(HEADLINE)
  if unknown or not chosen:
    parser.error(f"--tasks: expected a subset of {sorted(HEADLINE)}, got {args.tasks!r}")
  work = pathlib.Path(args.workdir).absolute()
  if work.exists():
    shutil.rmtree(work)
  work.mkdir(parents=True)
  t0 = time.time()
  pretrained = _pretrained(args, work)
  t1 = time.time()
  write_data(work / "data", args.ci, chosen)
  summary = {
    "pretrained": str(pretrained),
    "seconds": {"pretrain": t1 - t0, "data": time.time() - t1},
  }
  for task in chosen:
    summary[task] = run_task(task, work / "data", pretrained, work, args.ci)
  summary["seconds"]["total"] = time.time() - t0
  (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  print_summary(summary)
  return summary


def print_summary(summary: dict) -> None:
  print(f"\npre-trained model: {summary['pretrained']}")
  for task, rows in HEADLINE.items():
    if task not in summary:
      continue
    res = summary[task]
    print(f"{task}: zero-shot -> fine-tuned (held-out)")
    for key, label in rows:
      print(f"  {label:<18} {res['zero_shot'][key]:6.1f} -> {res['fine_tuned'][key]:6.1f}")
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in res["seconds"].items())
    print(f"  wall time: {secs}")
  print(f"total {summary['seconds']['total']:.0f} s")


if __name__ == "__main__":
  main()
