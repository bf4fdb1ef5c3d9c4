"""The MVPTR demo, end to end on a CPU (`make mvptr-demo`): synthetic data -> stage 1 -> stage 2
-> retrieval and phrase-grounding fine-tuning, all on the shared training loop, evaluated on
held-out images against chance and the untrained model.

  python -m x2vlm_jax.mvptr_demo [--workdir=/tmp/mvptr_demo] [--ci]

1. Writes the shapes world in the Oscar layout (`mvptr_synthetic.write_splits`: a train and a
   held-out split, disjoint scenes, exact phrase-grounding targets).
2. Trains the tiny MVPTR through `train_lib.train_and_evaluate` (what `train.py` runs): stage 1
   (configs/mvptr/tiny_stage1.py), stage 2 from stage 1's checkpoint (tiny_stage2.py), then
   retrieval fine-tuning from stage 2 (tiny_retrieval.py) and grounding fine-tuning from stage 2
   (tiny_grounding.py).
3. Evaluates on the held-out split (`evaluators/mvptr_run.py`): retrieval R@1 with the ITM
   re-ranking and with the VSC ranking alone (MVPTR-Uni), phrase-grounding accuracy (zero-shot:
   the paper's phrase-token vs region cosine of the pre-trained model; fine-tuned: the same
   query, trained), for the untrained model, the stage-2 model, and the fine-tuned ones;
   chance beside.
4. Prints the table and the wall time of each part; writes them to <workdir>/summary.json and
   <workdir>/summary.md.

`--ci`: fewer images and steps (a smoke run; its numbers mean little).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZES = {"train": 300, "heldout": 50, "stage1": 40, "stage2": 400, "retrieval": 300}
CI_SIZES = {"train": 24, "heldout": 6, "stage1": 2, "stage2": 2, "retrieval": 2}
RET = "eval/mvptr_retrieval/heldout"
GRD = "eval/mvptr_grounding/heldout"
COLUMNS = (  # (metric, header)
  (f"{RET}/img_r1", "text->image R@1"),
  (f"{RET}/txt_r1", "image->text R@1"),
  (f"{RET}_uni/img_r1", "VSC-only text->image R@1"),
  (f"{RET}_uni/txt_r1", "VSC-only image->text R@1"),
  (f"{GRD}/acc", "grounding acc"),
)


def _config(name: str, data: dict, **opts):
  import importlib  # pylint: disable=g-import-not-at-top

  module = importlib.import_module(f"configs.mvptr.{name}")
  arg = ",".join(f"{k}={v}" for k, v in {"spec": data["train"], **opts}.items())
  return module.get_config(arg)


def _train(c, workdir: pathlib.Path, steps: int, cache: str, eval_every: int = 0) -> float:
  from x2vlm_jax import train_lib  # pylint: disable=g-import-not-at-top

  c.train.update({"total_steps": steps, "compilation_cache_dir": cache})
  c.train.ckpt_every = steps
  if eval_every:
    c.train.eval_every = eval_every
  t0 = time.time()
  train_lib.train_and_evaluate(c, workdir)
  return time.time() - t0


def _last_eval(workdir: pathlib.Path) -> dict:
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)["metrics"]
    out.update({k: v for k, v in m.items() if k.startswith("eval/")})
  return out


def evaluate(c, variant: str) -> dict:
  """Held-out retrieval + grounding (`variant`) of the model `c` initialises (no training)."""
  import jax  # pylint: disable=g-import-not-at-top

  from x2vlm_jax import init_lib, sharding, train_eval  # pylint: disable=g-import-not-at-top
  from x2vlm_jax import run_config as rc  # pylint: disable=g-import-not-at-top
  from x2vlm_jax.evaluators import mvptr_run  # pylint: disable=g-import-not-at-top

  c.eval.evaluators = ("mvptr_retrieval", "mvptr_grounding")
  c.eval.mvptr_grounding.variant = variant  # the section _eval_sections set
  model_cfg = rc.model_config(c)
  mesh = sharding.make_mesh({"data": -1})
  init = init_lib.initialize(rc.init_config(c), model_cfg, mesh, jax.random.key(0, impl="rbg"))
  eval_cfg = train_eval.run_eval_config(c, model_cfg)
  return mvptr_run.evaluate(init.model, eval_cfg, lambda s: None)


def _eval_sections(c, data: dict, k_c: int, k_i: int):
  """Both evaluators on the held-out split (retrieval k_c / k_i as the tiny config)."""
  from configs.mvptr import finetune as ft  # pylint: disable=g-import-not-at-top

  c.eval.mvptr_retrieval = ft.retrieval_eval(data["heldout"], k_c=k_c, k_i=k_i, split="heldout")
  c.eval.mvptr_grounding = ft.grounding_eval(data["heldout"], "paper", split="heldout")
  return c


def run(work: pathlib.Path, sizes: dict) -> dict:
  from data_pipelines import mvptr_synthetic  # pylint: disable=g-import-not-at-top

  times, rows, cache = {}, {}, str(work / "xla_cache")
  t0 = time.time()
  data = mvptr_synthetic.write_splits(str(work / "data"), sizes["train"], sizes["heldout"])
  times["data"] = time.time() - t0
  runs = {k: work / k for k in ("stage1", "stage2", "retrieval", "grounding")}
  opts = {"val": data["heldout"]}

  t0 = time.time()
  untrained = _eval_sections(_config("tiny_retrieval", data, **opts, stage2="-"), data, 16, 8)
  untrained.init.checkpoint = ""  # every parameter from its initializer
  rows["untrained"] = evaluate(untrained, "paper")
  times["eval untrained"] = time.time() - t0

  times["stage 1"] = _train(_config("tiny_stage1", data), runs["stage1"], sizes["stage1"], cache)
  s2 = _config("tiny_stage2", data, stage1=runs["stage1"])
  times["stage 2"] = _train(s2, runs["stage2"], sizes["stage2"], cache)

  t0 = time.time()
  zero = _eval_sections(_config("tiny_retrieval", data, **opts, stage2=runs["stage2"]), data, 16, 8)
  rows["stage 2 (zero-shot; ITM head untrained)"] = evaluate(zero, "paper")
  times["eval stage 2"] = time.time() - t0

  ret = _config("tiny_retrieval", data, **opts, stage2=runs["stage2"])
  steps = sizes["retrieval"]
  times["retrieval fine-tuning"] = _train(ret, runs["retrieval"], steps, cache, steps)
  grd = _config("tiny_grounding", data, **opts, stage2=runs["stage2"])
  times["grounding fine-tuning"] = _train(grd, runs["grounding"], steps, cache, steps)
  rows["retrieval fine-tuned"] = _last_eval(runs["retrieval"])
  rows["grounding fine-tuned"] = _last_eval(runs["grounding"])
  first = rows["untrained"]
  rows["chance"] = {
    **{m: first[f"{RET}/chance_r1"] for m, _ in COLUMNS[:4]},
    f"{GRD}/acc": first[f"{GRD}/chance_acc"],
  }
  return {"sizes": sizes, "data": data, "rows": rows, "seconds": times}


def table(summary: dict) -> str:
  """The summary as a Markdown table ('-' where a model was not evaluated on a metric)."""
  head = "| model | " + " | ".join(h for _, h in COLUMNS) + " |"
  lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
  for name, m in summary["rows"].items():
    cells = [f"{m[k]:.1f}" if k in m else "-" for k, _ in COLUMNS]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  s = summary["sizes"]
  lines.append(
    f"\nheld-out: {s['heldout']} images; train: {s['train']} images; steps: stage 1 {s['stage1']}"
    f", stage 2 {s['stage2']}, fine-tuning {s['retrieval']} each. Grounding: the paper's "
    "phrase-token vs region cosine, IoU > 0.5. R@1 re-ranked by the ITM match probability "
    "(top 16 texts / 8 images) and by the VSC cosine alone."
  )
  lines.append("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/mvptr_demo")
  parser.add_argument("--ci", action="store_true", help="a smaller smoke run")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(REPO))  # the configs package
  work = pathlib.Path(args.workdir)
  if work.exists():
    shutil.rmtree(work)  # a fresh run: old checkpoints would be resumed
  work.mkdir(parents=True)
  t0 = time.time()
  summary = run(work, CI_SIZES if args.ci else SIZES)
  summary["seconds"]["total"] = time.time() - t0
  text = table(summary)
  print(text)
  (work / "summary.md").write_text(text + "\n")
  (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
  return summary


if __name__ == "__main__":
  main()
