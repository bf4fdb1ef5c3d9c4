"""Where the time of the pre-training step goes: a per-op profile of bench/train_step.py's step.

  python bench/profile_step.py [every bench/train_step.py flag: --variant / --dims, batch sizes,
      --mesh, --remat, --attention, ...] [--profile_steps 3 --warmup 2 --steps 5
      --trace_dir DIR --top 25 --json out.json]
  python bench/profile_step.py --from_trace DIR [--json out.json]   # re-read a saved trace

Builds and compiles exactly the step bench/train_step.py times (`train_step.build`: the train
state born sharded, `step_jit.pretrain_step`, one fixed random MixedBatch), runs `--warmup`
untimed steps and `--steps` timed ones WITHOUT the profiler (the reference step time), then
traces `--profile_steps` steps with `jax.profiler.trace` (host tracer on, Python tracer off).
The Perfetto trace and the optimised HLO text of the step (`hlo.txt`) are kept in `--trace_dir`
(open the trace in ui.perfetto.dev). bench/profile_parse.py reads them: on XLA CPU every
executed HLO op (thunk) is one trace event, so it prints the time per step by category (GEMM,
copies / transposes, dynamic-update-slices, random bits, ...) and the `--top` ops, as Markdown;
`--json` also writes the whole summary.

Figures: `op time` is the EXCLUSIVE time of every op summed over the executor's threads (XLA
CPU runs independent ops concurrently, so it can exceed the step); shares are of that sum.
The tracer records two events per op, so a traced step of many small ops can be slower than an
untraced one (both are printed); the ranking, not the absolute figure, is the result.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import profile_parse  # noqa: E402  (a sibling script, like dims)
import train_step  # noqa: E402


def _args():
  p = train_step.parser(__doc__)
  p.set_defaults(warmup=2)
  p.add_argument("--profile_steps", type=int, default=3, help="steps traced by the profiler")
  p.add_argument("--trace_dir", default="", help="default: a new /tmp/x2vlm-profile-* folder")
  p.add_argument("--top", type=int, default=25, help="ops listed one by one")
  p.add_argument("--json", default="", help="also write the summary to this JSON file")
  p.add_argument("--from_trace", default="", help="only summarise the trace saved in this folder")
  return p.parse_args()


def trace_file(trace_dir: str) -> str:
  """The newest trace JSON jax.profiler.trace wrote under trace_dir."""
  for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz"):
    found = glob.glob(os.path.join(trace_dir, "**", pattern), recursive=True)
    if found:
      return max(found, key=os.path.getmtime)
  raise SystemExit(f"--trace_dir {trace_dir}: no perfetto_trace.json.gz / *.trace.json.gz in it")


def summarize_dir(trace_dir: str, top: int) -> dict:
  """bench/profile_parse.py's summary of the trace (and hlo.txt, if there) in trace_dir."""
  hlo_path = os.path.join(trace_dir, "hlo.txt")
  hlo = None
  if os.path.exists(hlo_path):
    with open(hlo_path, encoding="utf-8") as f:
      hlo = profile_parse.parse_hlo(f.read())
  return profile_parse.summarize(profile_parse.load_trace(trace_file(trace_dir)), hlo, top=top)


def _profile(args) -> tuple[str, dict]:
  """Build, time and trace the step; (trace folder, facts about the run)."""
  import tempfile

  import jax

  built = train_step.build(args)
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="x2vlm-profile-")
  os.makedirs(trace_dir, exist_ok=True)
  with open(os.path.join(trace_dir, "hlo.txt"), "w", encoding="utf-8") as f:
    f.write(built["compiled"].as_text())
  run = train_step.stepper(built)
  train_step.timed(run, args.warmup)
  plain, _ = train_step.timed(lambda i: run(1000 + i), args.steps)
  options = jax.profiler.ProfileOptions()
  options.host_tracer_level = 2  # host events, including one per executed HLO op (thunk)
  options.python_tracer_level = 0
  load = os.getloadavg()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=options):
    traced, _ = train_step.timed(lambda i: run(2000 + i), args.profile_steps)
  facts = {
    "compile_s": round(built["compile_s"], 2),
    "step_s_untraced_median": round(statistics.median(plain), 4),
    "step_s_untraced": [round(t, 4) for t in plain],
    "step_s_traced": [round(t, 4) for t in traced],
    "load_average_1_5_15": [round(x, 2) for x in load],
    "trace_dir": trace_dir,
    "time_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
  }
  return trace_dir, facts


def main():
  args = _args()
  if args.from_trace:
    trace_dir, facts = args.from_trace, {"trace_dir": args.from_trace}
  else:
    trace_dir, facts = _profile(args)
  summary = summarize_dir(trace_dir, args.top)
  for key, value in facts.items():
    print(f"- {key}: {value}")
  print()
  print(profile_parse.markdown(summary))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"run": facts, "args": vars(args)} | summary, f, indent=1)


if __name__ == "__main__":
  main()
