"""Speed of the sharded pre-training step; prints one JSON object.

  python bench/train_step.py --variant tiny|base [--image_batch 8 --region_batch 8
      --region_max_images 4 --video_batch 0 --max_tokens 40 --image_res 224
      --dtype float32|bfloat16 --remat [full|save_matmuls|save_dots|save_all_but_attention|none]
      --attention einsum|xla|cudnn --scan_unroll 1 --mesh data=1,fsdp=-1,tensor=1 --steps 5
      --peak_tflops 989 --cpu_devices 8 --fast_compile --cpu_xla_defaults --out rows.jsonl]

A model given by its dimensions instead of a variant: `--dims` overrides the variant's sizes,
e.g. the official code's tiny test model (every tower 64 wide with 4 heads and MLP 256; 2 vision,
2 text and 2 fusion layers; vocab 1024; ITC embedding 32) at 96 px, text 16, 6 masks:

  python bench/train_step.py --dims width=64,heads=4,mlp=256,layers=2+2+2,vocab=1024,embed=32 \
      --image_res 96 --max_tokens 16 --max_masks 6 --image_batch 8 --region_batch 8 \
      --region_max_images 4 --mesh data=1

`--dims` keys: bench/dims.py.

Runs exactly the trainer's step: the train state born sharded (`train_state.TrainStateSpec`),
the step built and jitted by `step_jit.pretrain_step` and the host batch placed by
`global_batch.put` (with `--accum_steps` A > 1, A micro-batches stacked as the trainer does).
It compiles the step once ahead of time (reported: `compile_s`), then times
`--steps` steady-state steps after `--warmup` untimed ones on one fixed random MixedBatch.
Reports examples/s per kind, the step time, FLOPs per step, MFU = model FLOPs / step time /
(peak x devices), and the peak device memory (`device.memory_stats()` where the backend has it,
else XLA's `memory_analysis()` of the compiled step).

FLOPs: `xla_flops_*` is XLA's `compiled.cost_analysis()`, which counts the body of a while loop
ONCE, and every tower is a scan over its layers (unless `--scan_unroll` >= its depth), so it
undercounts by about the depth (checked: a 16-step scan of a matmul reports the FLOPs of one).
`model_flops_per_step` is therefore an analytic count of the matmul and attention FLOPs of the
step as written (every tower call, the K/V projections, the MLM decoder at the masked positions;
backward = 2x forward; remat recomputation not counted, as usual for MFU), and MFU uses it.
Batch sizes are global (over the whole mesh). `--fast_compile` uses the CPU compile options of
the tests (much faster compilation, slower code); never use it for reported speeds.
`--cpu_xla_defaults` compiles without the trainer's `step_jit.CPU_STEP_OPTIONS` (A/B;
bench/step_ab.py compares both in one process). The host settings of the trainer
(`x2vlm_jax.cpu_host`: glibc keeps the step's memory mapped) are made as in train.py with the
configs' defaults; `--no_cpu_host_tuning` leaves glibc's defaults and `--cpu_sync_dispatch` adds
`train.cpu_sync_dispatch` (A/B between processes; `page_faults_per_step` shows the effect).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def parser(description: str = __doc__) -> argparse.ArgumentParser:
  """The model, batch and mesh flags (bench/profile_step.py adds its own to them)."""
  p = argparse.ArgumentParser(
    description=description, formatter_class=argparse.RawTextHelpFormatter
  )
  p.add_argument("--variant", default="tiny", choices=["tiny", "demo", "base", "large"])
  p.add_argument("--image_batch", type=int, default=8)
  p.add_argument("--region_batch", type=int, default=8)
  p.add_argument("--region_max_images", type=int, default=4)
  p.add_argument("--video_batch", type=int, default=0)
  p.add_argument("--frame_len", type=int, default=3)
  p.add_argument("--max_tokens", type=int, default=40)
  p.add_argument("--max_masks", type=int, default=12)
  p.add_argument("--image_res", type=int, default=None, help="default: the variant's")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument(
    "--remat",
    nargs="?",
    const="full",
    default="none",
    choices=["none", "full", "save_matmuls", "save_dots", "save_all_but_attention"],
    help="remat policy of every tower (bare --remat: full)",
  )
  p.add_argument("--attention", default="einsum", choices=["einsum", "xla", "cudnn"])
  p.add_argument(
    "--scan_unroll",
    type=int,
    default=1,
    help="layers per iteration of each tower's layer loop (model.scan_unroll; >= depth: no loop)",
  )
  p.add_argument("--dims", default="", help="model dimensions overriding the variant (above)")
  p.add_argument("--tag", default="", help="a name for the row (bench/gpu.sh: the row name)")
  p.add_argument("--out", default="", help="also append the JSON row to this file (JSON lines)")
  p.add_argument("--no_itm", action="store_true", help="the step without ITM (itm=False)")
  p.add_argument(
    "--accum_steps",
    type=int,
    default=1,
    help="micro-batches per update (batch sizes are per update, as in configs)",
  )
  p.add_argument("--mesh", default="data=-1", help="e.g. data=2,fsdp=4,tensor=1")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument(
    "--peak_tflops",
    type=float,
    default=0.0,
    help="peak TFLOP/s of ONE device for MFU (H100 SXM bf16 dense: 989)",
  )
  p.add_argument(
    "--cpu_devices", type=int, default=0, help="simulate N CPU devices (sets XLA_FLAGS; CPU only)"
  )
  p.add_argument("--fast_compile", action="store_true")
  p.add_argument(
    "--no_cpu_host_tuning",
    action="store_true",
    help="leave glibc's malloc defaults (x2vlm_jax.cpu_host; A/B)",
  )
  p.add_argument(
    "--cpu_sync_dispatch",
    action="store_true",
    help="CPU executions on the dispatching thread (train.cpu_sync_dispatch; x2vlm_jax.cpu_host)",
  )
  p.add_argument(
    "--cpu_xla_defaults",
    action="store_true",
    help="CPU: XLA's default options instead of the trainer's step_jit.CPU_STEP_OPTIONS (A/B)",
  )
  return p


def _mesh_shape(text: str) -> dict[str, int]:
  out = {}
  for part in filter(None, text.split(",")):
    name, _, value = part.partition("=")
    out[name.strip()] = int(value)
  return out


def _peak_memory(compiled, devices) -> dict:
  stats = [d.memory_stats() for d in devices]
  if all(stats) and all("peak_bytes_in_use" in s for s in stats):
    return {
      "peak_bytes_per_device": max(s["peak_bytes_in_use"] for s in stats),
      "source": "device.memory_stats",
    }
  m = compiled.memory_analysis()
  if m is None:
    return {"source": "unavailable"}
  total = (
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )
  return {
    "peak_bytes_per_device": int(total),
    "source": "compiled.memory_analysis",
    "argument_bytes": int(m.argument_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
  }


def _model_and_sizes(args):
  """(ModelConfig, per-micro-batch BatchSizes, per-update sizes) from the flags."""
  import dataclasses

  import dims as dims_lib
  import jax.numpy as jnp

  from data_pipelines import features as F
  from x2vlm_jax.models.config import ModelConfig

  kw = dict(
    dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
    remat=args.remat,
    attention=args.attention,
    scan_unroll=args.scan_unroll,
  )
  if args.video_batch:
    kw["frame_len"] = args.frame_len
  cfg = dims_lib.with_dims(ModelConfig.named(args.variant, **kw), args.dims)
  if args.image_res:
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=args.image_res))
  accum = args.accum_steps
  per_update = dict(
    image_batch=args.image_batch,
    region_batch=args.region_batch,
    region_max_images=args.region_max_images if args.region_batch else 0,
    video_batch=args.video_batch,
  )
  if any(v % accum for v in per_update.values()):
    raise SystemExit(f"every batch size must be divisible by --accum_steps {accum}")
  sizes = F.BatchSizes(
    image_res=cfg.vision.image_size,
    patch_size=cfg.vision.patch_size,
    max_tokens=args.max_tokens,
    max_masks=args.max_masks,
    frame_len=args.frame_len,
    **{k: v // accum for k, v in per_update.items()},
  )
  return cfg, sizes, per_update


def timed(fn, n: int) -> tuple[list[float], object]:
  """Wall seconds of n calls of fn(i) (each waited for), and the last result."""
  import jax

  times, out = [], None
  for i in range(n):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(i))
    times.append(time.perf_counter() - t0)
  return times, out


def _report(args, cfg, sizes, per_update, mesh, state, compiled, metrics, timings) -> dict:
  """The printed JSON object (see the module docstring for the fields)."""
  import jax
  import numpy as np

  from data_pipelines import features as F
  from x2vlm_jax import flops as flops_lib

  times, itm, accum = timings["times"], not args.no_itm, args.accum_steps
  init_s, lower_s, compile_s = timings["init_s"], timings["lower_s"], timings["compile_s"]
  step_s = float(np.median(times))
  n_dev = mesh.devices.size
  mflops = flops_lib.step_flops(cfg, sizes, itm) * accum
  examples = {
    F.IMAGE: args.image_batch,
    "region_texts": args.region_batch,
    "region_images": per_update["region_max_images"],
    F.VIDEO: args.video_batch,
  }
  out = {
    "device": jax.devices()[0].device_kind,
    "platform": jax.devices()[0].platform,
    "num_devices": n_dev,
    "mesh": dict(mesh.shape),
    "variant": args.variant,
    "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"]))),
    "dtype": args.dtype,
    "remat": args.remat,
    "attention": args.attention,
    "scan_unroll": args.scan_unroll,
    "dims": args.dims or None,
    "tag": args.tag or None,
    "itm": itm,
    "image_res": sizes.image_res,
    "max_tokens": args.max_tokens,
    "batch": {k: v for k, v in examples.items() if v},
    "accum_steps": accum,
    "fast_compile": args.fast_compile,
    "cpu_options": "fast_compile"
    if args.fast_compile
    else ("xla_defaults" if args.cpu_xla_defaults else "step"),
    "cpu_host": timings.get("cpu_host"),
    "page_faults_per_step": timings.get("page_faults_per_step"),  # host minor faults, timed steps
    "init_s": round(init_s, 2),
    "lower_s": round(lower_s, 2),
    "compile_s": round(compile_s, 2),
    "steps_timed": args.steps,
    "step_s": round(step_s, 4),
    "step_s_min": round(min(times), 4),
    "step_s_max": round(max(times), 4),
    "examples_per_s": {k: round(v / step_s, 3) for k, v in examples.items() if v},
    "model_flops_per_step": mflops,
    "model_tflops_per_s_per_device": round(mflops / n_dev / step_s / 1e12, 5),
    "mfu": (
      round(mflops / n_dev / step_s / (args.peak_tflops * 1e12), 4) if args.peak_tflops else None
    ),
    "xla_flops_per_step_per_device": _flops(compiled),  # scanned layers once: a lower bound
    "memory": _peak_memory(compiled, mesh.devices.flat),
    "loss": float(metrics["loss/total"]),
    "loss_finite": bool(np.isfinite(float(metrics["loss/total"]))),
  }
  return out


def build(args) -> dict:
  """The trainer's step for the flags, compiled, with its state and batch (see the docstring).

  Returns cfg, sizes, per_update, mesh, state, batch, key, compiled, init_s, lower_s, compile_s.
  """
  if args.cpu_devices:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={args.cpu_devices}"
    )
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax

  from data_pipelines.testing.random_batch import random_batch
  from x2vlm_jax import cpu_host, global_batch, optim, sharding, step_jit

  # As train.py, before any device use.
  host = cpu_host.setup(not args.no_cpu_host_tuning, args.cpu_sync_dispatch)
  from x2vlm_jax.objectives import StepConfig
  from x2vlm_jax.train_state import TrainStateSpec

  cfg, sizes, per_update = _model_and_sizes(args)
  accum, itm = args.accum_steps, not args.no_itm
  mesh = sharding.make_mesh(_mesh_shape(args.mesh))
  options = step_jit.compile_options(args.fast_compile)  # the trainer's (train_lib)
  if args.cpu_xla_defaults and not args.fast_compile:
    options = None
  spec = TrainStateSpec.build(cfg, optim.OptimConfig(total_steps=10_000, warmup_steps=0), mesh)
  (init_s,), state = timed(
    lambda _: spec.init(jax.random.key(0, impl="rbg"), compiler_options=options), 1
  )
  batch = global_batch.put(
    [random_batch(sizes, vocab=cfg.text.vocab_size, seed=i) for i in range(accum)], mesh
  )
  step = step_jit.pretrain_step(spec, StepConfig(), accum, compiler_options=options)
  key = jax.random.key(1)
  (lower_s,), lowered = timed(lambda _: step.lower(state, batch, key, itm), 1)
  (compile_s,), compiled = timed(lambda _: lowered.compile(), 1)
  return dict(
    cfg=cfg,
    sizes=sizes,
    per_update=per_update,
    mesh=mesh,
    state=state,
    batch=batch,
    key=key,
    compiled=compiled,
    init_s=init_s,
    lower_s=lower_s,
    compile_s=compile_s,
    cpu_host=host,
  )


def stepper(built: dict):
  """run(i): one step of the compiled step on the built state (kept in `built`), its metrics."""
  import jax

  def run(i):
    built["state"], metrics = built["compiled"](
      built["state"], built["batch"], jax.random.fold_in(built["key"], i)
    )
    return metrics

  return run


def main():
  args = parser().parse_args()
  b = build(args)
  state0 = b["state"]  # the report counts the parameters of the initial state
  run = stepper(b)
  timed(run, args.warmup)
  faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  times, metrics = timed(lambda i: run(1000 + i), args.steps)
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / args.steps
  timings = {k: b[k] for k in ("init_s", "lower_s", "compile_s")} | {"times": times}
  timings |= {"cpu_host": b["cpu_host"], "page_faults_per_step": round(faults)}
  out = _report(
    args, b["cfg"], b["sizes"], b["per_update"], b["mesh"], state0, b["compiled"], metrics, timings
  )
  print(json.dumps(out, indent=1))
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(json.dumps(out) + "\n")


def _flops(compiled) -> float | None:
  """FLOPs of one step on one device, from XLA's cost analysis (None if unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


if __name__ == "__main__":
  main()
