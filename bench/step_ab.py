"""A/B of two settings of the trainer's step in ONE process: the step is built and compiled
under each flag set of bench/train_step.py, then both are timed in alternating rounds, so the
drift of a shared host between processes (+-15 % here) does not decide the comparison.

  python bench/step_ab.py --dims width=64,heads=4,mlp=256,layers=2+2+2,vocab=1024,embed=32 \\
      --image_res 96 --max_tokens 16 --max_masks 6 --image_batch 8 --region_batch 8 \\
      --region_max_images 4 --mesh data=1 --rounds 10 --steps 10 --b "--scan_unroll 2"

The shared flags are bench/train_step.py's; `--a` / `--b` add flags to each side (default:
A = the shared flags alone, B = `--cpu_xla_defaults`, i.e. the trainer's CPU options
`step_jit.CPU_STEP_OPTIONS` against XLA's defaults). Prints one JSON object: per side its flags,
compile seconds, the median, p10 and minimum step time over rounds x steps, and the loss of its
first step (equal on both sides when the settings change how the step computes, not what).
Host settings (`x2vlm_jax.cpu_host`) are per process and so the same on both sides.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (bench/train_step.py, beside this file)


def main():
  p = train_step.parser(__doc__)
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--a", default="", help="flags added on side A")
  p.add_argument("--b", default="--cpu_xla_defaults", help="flags added on side B")
  argv = sys.argv[1:]
  shared = p.parse_args(argv)
  import jax

  runs, report = {}, {}
  for side in ("a", "b"):
    extra = shlex.split(getattr(shared, side))
    args = p.parse_args(argv + extra)
    built = train_step.build(args)
    run = train_step.stepper(built)
    loss = float(jax.device_get(run(0))["loss/total"])
    train_step.timed(lambda i, run=run: run(1 + i), args.warmup)
    runs[side] = run
    report[side] = {
      "flags": " ".join(extra),
      "compile_s": round(built["compile_s"], 2),
      "first_loss": loss,
      "times": [],
    }
    print(f"{side} ({' '.join(extra)}): compiled in {built['compile_s']:.1f} s", file=sys.stderr)
  for r in range(shared.rounds):
    for side, run in runs.items():
      times, _ = train_step.timed(lambda i, run=run: run(1000 * (r + 1) + i), shared.steps)
      report[side]["times"] += times
  for row in report.values():
    times = sorted(row.pop("times"))
    row |= {
      "step_s": round(statistics.median(times), 4),
      "step_s_p10": round(times[len(times) // 10], 4),
      "step_s_min": round(times[0], 4),
      "n": len(times),
    }
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
