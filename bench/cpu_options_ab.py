"""A/B of the trainer's CPU options (`step_jit.CPU_STEP_OPTIONS`) against XLA's defaults: the
step compiled both ways (bench/train_step.py's `--cpu_xla_defaults` off and on) in ONE process,
then timed in alternating rounds, so that the drift of a shared host between processes (+-15 %
here) does not decide the comparison.

  python bench/cpu_options_ab.py --dims width=64,heads=4,mlp=256,layers=2+2+2,vocab=1024,embed=32 \\
      --image_res 96 --max_tokens 16 --max_masks 6 --image_batch 8 --region_batch 8 \\
      --region_max_images 4 --mesh data=1 --rounds 10 --steps 10

Takes bench/train_step.py's model, batch and mesh flags. Prints one JSON object: per setting
(`step`, `xla_defaults`) the compile seconds, the median, p10 and minimum step time over
rounds x steps, and the loss of its first step (equal for both: the options change no number).
"""

from __future__ import annotations

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (bench/train_step.py, beside this file)


def main():
  p = train_step.parser(__doc__)
  p.add_argument("--rounds", type=int, default=10)
  args = p.parse_args()
  if args.fast_compile:
    raise SystemExit("--fast_compile replaces both option sets; nothing to compare")
  import jax

  runs, report = {}, {}
  for setting in ("step", "xla_defaults"):
    args.cpu_xla_defaults = setting == "xla_defaults"
    built = train_step.build(args)
    run = train_step.stepper(built)
    loss = float(jax.device_get(run(0))["loss/total"])
    train_step.timed(lambda i: run(1 + i), args.warmup)
    runs[setting] = run
    report[setting] = {"compile_s": round(built["compile_s"], 2), "first_loss": loss, "times": []}
    print(f"{setting}: compiled in {built['compile_s']:.1f} s", file=sys.stderr, flush=True)
  for r in range(args.rounds):
    for setting, run in runs.items():
      times, _ = train_step.timed(lambda i, run=run: run(1000 * (r + 1) + i), args.steps)
      report[setting]["times"] += times
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
