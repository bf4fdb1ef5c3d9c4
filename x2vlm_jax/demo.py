"""The demo, end to end on a CPU: data -> train.py -> eval.py -> summary (`make demo`).

  python -m x2vlm_jax.demo [--workdir=/tmp/x2vlm_demo] [--ci]

1. Writes the shapes world as official JSON lines under <workdir>/data: training splits from
   `synthetic.TRAIN_SEED`, held-out splits from `synthetic.HELDOUT_SEED` (scenes never seen in
   training), in the layout `configs/demo.py:data=DIR` reads through the production readers.
2. Trains `configs/demo.py` with `train.py` (a subprocess, exactly as a user would run it).
3. Evaluates the final checkpoint with `eval.py` on the held-out splits: text<->image retrieval
   (ITC top-k + ITM re-ranking) and grounding, and draws predicted vs true boxes into
   <workdir>/grounding.png.
4. Prints the headline numbers against their baselines (chance; whole image and mean box), the
   first and last logged losses, and the wall time of each stage; writes them to
   <workdir>/summary.json.

A previous run in the same workdir is removed first (the trainer would otherwise resume it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "demo.py"
LOSS_KEYS = (
  "train/loss/total",
  "train/loss/itc/image",
  "train/loss/itm/image",
  "train/loss/box_l1/region",
  "train/loss/box_giou/region",
)


def write_data(data_dir: pathlib.Path, ci: bool) -> dict[str, int]:
  """Generates the four JSON-lines splits; returns records per split."""
  sys.path.insert(0, str(REPO))
  from configs import demo as demo_cfg  # pylint: disable=g-import-not-at-top
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top

  cfg = demo_cfg.get_config("ci" if ci else None)
  steps = int(cfg.train.total_steps)
  heldout = demo_cfg.CI_HELDOUT if ci else demo_cfg.HELDOUT
  world_cfg = synthetic.WorldConfig(**demo_cfg.WORLD)
  counts = {
    # Enough records that a run reads each about once (region records yield several texts).
    "image_train": steps * int(cfg.batch.image),
    "region_train": steps * int(cfg.batch.region_max_images),
    "image_heldout": heldout["retrieval_images"],
    "region_heldout": heldout["grounding_records"],
  }
  dirs = demo_cfg.splits(str(data_dir))
  for name, n in counts.items():
    kind, split = name.split("_")
    seed = synthetic.TRAIN_SEED if split == "train" else synthetic.HELDOUT_SEED
    synthetic.write_jsonl(synthetic.ShapesWorld(world_cfg, seed=seed), kind, n, dirs[name])
  return counts


def run_stage(cmd: list[str], log_path: pathlib.Path) -> None:
  """Runs a stage, echoing its output and keeping a copy; raises on failure."""
  print("$ " + " ".join(cmd), flush=True)
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
      cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in proc.stdout:
      log.write(line)
      if "Warning" not in line and "warn(" not in line:
        print("  " + line.rstrip(), flush=True)
    if proc.wait():
      raise SystemExit(f"stage failed (exit {proc.returncode}): {' '.join(cmd)}; log: {log_path}")


def read_losses(metrics_jsonl: pathlib.Path) -> dict[str, tuple[float, float]]:
  """{loss name: (first logged value, last logged value)} from the trainer's metrics.jsonl."""
  first, last = {}, {}
  with open(metrics_jsonl) as f:
    for line in f:
      values = json.loads(line)["metrics"]
      for k in LOSS_KEYS:
        if k in values:
          first.setdefault(k, values[k])
          last[k] = values[k]
  return {k: (first[k], last[k]) for k in first}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/x2vlm_demo", help="data, run and outputs")
  parser.add_argument("--ci", action="store_true", help="the short CI variant")
  args = parser.parse_args(argv)
  work = pathlib.Path(args.workdir).absolute()
  if work.exists():
    shutil.rmtree(work)
  work.mkdir(parents=True)
  arg = f"data={work / 'data'}" + (",ci" if args.ci else "")
  config = f"{CONFIG}:{arg}"
  times = {}

  t0 = time.time()
  counts = write_data(work / "data", args.ci)
  times["data"] = time.time() - t0
  print(f"wrote JSON lines under {work / 'data'}: {counts} ({times['data']:.0f} s)", flush=True)

  t0 = time.time()
  run_stage(
    [
      sys.executable,
      "train.py",
      f"--config={config}",
      f"--workdir={work / 'run'}",
      f"--config.train.compilation_cache_dir={work / 'jax_cache'}",
    ],
    work / "train.log",
  )
  times["train"] = time.time() - t0

  t0 = time.time()
  run_stage(
    [
      sys.executable,
      "eval.py",
      f"--config={config}",
      f"--checkpoint={work / 'run'}",
      f"--png={work / 'grounding.png'}",
      f"--output={work / 'metrics.json'}",
    ],
    work / "eval.log",
  )
  times["eval"] = time.time() - t0

  metrics = json.loads((work / "metrics.json").read_text())
  losses = read_losses(work / "run" / "metrics.jsonl")
  summary = {"metrics": metrics, "losses": losses, "seconds": times, "records": counts}
  (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  print_summary(summary, work)
  return summary


def print_summary(summary: dict, work: pathlib.Path) -> None:
  """The demo's result block."""
  m, t = summary["metrics"], summary["seconds"]
  r = lambda d, p="retrieval": " / ".join(f"{m[f'eval/{p}/{d}_r{k}']:5.1f}" for k in (1, 5, 10))
  print("\n==== X2-VLM demo: held-out shapes world ====")
  print(
    f"images {m['eval/retrieval/num_images']:.0f}, captions {m['eval/retrieval/num_texts']:.0f}, "
    f"grounding phrases {m['eval/grounding/count']:.0f}"
  )
  print(f"text->image  R@1/5/10: {r('img')}   (chance R@1 {m['eval/retrieval/chance_r1']:.1f})")
  print(f"image->text  R@1/5/10: {r('txt')}")
  print(
    f"ranked by ITC similarity only (no ITM re-ranking): text->image {r('img', 'retrieval_itc')}, "
    f"image->text {r('txt', 'retrieval_itc')}"
  )
  print(
    f"grounding accuracy (IoU >= 0.5): {m['eval/grounding/acc']:.1f} "
    f"(baselines: whole image {m['eval/grounding/acc_whole_image']:.1f}, "
    f"mean box {m['eval/grounding/acc_mean_box']:.1f}; "
    f"mean IoU {m['eval/grounding/mean_iou']:.2f})"
  )
  for k, (a, b) in summary["losses"].items():
    print(f"{k:28s} {a:8.3f} -> {b:8.3f}")
  print(
    f"wall time: data {t['data']:.0f} s, train {t['train']:.0f} s, eval {t['eval']:.0f} s, "
    f"total {sum(t.values()):.0f} s"
  )
  print(f"boxes: {work / 'grounding.png'} (green = true, red = predicted)")


if __name__ == "__main__":
  main()
