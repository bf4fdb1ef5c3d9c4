"""Speed of the sharded pre-training step; prints one JSON object.

  python bench/train_step.py --variant tiny|base [--image_batch 8 --region_batch 8
      --region_max_images 4 --video_batch 0 --max_tokens 40 --image_res 224
      --dtype float32|bfloat16 --remat --mesh data=1,fsdp=-1,tensor=1 --steps 5
      --peak_tflops 989 --cpu_devices 8 --fast_compile]

Builds the train state born sharded (`step_jit.create_train_state`), jits the step for the mesh
(`step_jit.jit_train_step`), compiles it once ahead of time (reported: `compile_s`), then times
`--steps` steady-state steps after `--warmup` untimed ones on one fixed random MixedBatch.
Reports examples/s per kind, the step time, FLOPs per step, MFU = model FLOPs / step time /
(peak x devices), and the peak device memory (`device.memory_stats()` where the backend has it,
else XLA's `memory_analysis()` of the compiled step).

FLOPs: `xla_flops_*` is XLA's `compiled.cost_analysis()`, which counts the body of a while loop
ONCE, and every tower is a scan over its layers, so it undercounts by about the depth (checked:
a 16-step scan of a matmul reports the FLOPs of one). `model_flops_per_step` is therefore an
analytic count of the matmul and attention FLOPs of the step as written (every tower call, the
K/V projections, the MLM decoder at the masked positions; backward = 2x forward; remat
recomputation not counted, as usual for MFU), and MFU uses it.
Batch sizes are global (over the whole mesh). `--fast_compile` uses the CPU compile options of
the tests (much faster compilation, slower code); never use it for reported speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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
  p.add_argument("--remat", action="store_true")
  p.add_argument("--no_itm", action="store_true", help="the step without ITM (itm=False)")
  p.add_argument("--mesh", default="data=-1", help="e.g. data=2,fsdp=4,tensor=1")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="peak TFLOP/s of ONE device for MFU (H100 SXM bf16 dense: 989)")
  p.add_argument("--cpu_devices", type=int, default=0,
                 help="simulate N CPU devices (sets XLA_FLAGS; CPU only)")
  p.add_argument("--fast_compile", action="store_true")
  return p.parse_args()


def _mesh_shape(text: str) -> dict[str, int]:
  out = {}
  for part in filter(None, text.split(",")):
    name, _, value = part.partition("=")
    out[name.strip()] = int(value)
  return out


def _peak_memory(compiled, devices) -> dict:
  stats = [d.memory_stats() for d in devices]
  if all(stats) and all("peak_bytes_in_use" in s for s in stats):
    return {"peak_bytes_per_device": max(s["peak_bytes_in_use"] for s in stats),
            "source": "device.memory_stats"}
  m = compiled.memory_analysis()
  if m is None:
    return {"source": "unavailable"}
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return {"peak_bytes_per_device": int(total), "source": "compiled.memory_analysis",
          "argument_bytes": int(m.argument_size_in_bytes),
          "temp_bytes": int(m.temp_size_in_bytes)}


def main():
  args = _args()
  if args.cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np

  from data_pipelines import features as F
  from data_pipelines.testing.random_batch import random_batch
  from x2vlm_jax import flops as flops_lib, optim, sharding, step_jit
  from x2vlm_jax import train_step as ts
  from x2vlm_jax.models.config import ModelConfig

  kw = dict(dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32, remat=args.remat)
  if args.video_batch:
    kw["frame_len"] = args.frame_len
  cfg = ModelConfig.named(args.variant, **kw)
  if args.image_res:
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=args.image_res))
  res = cfg.vision.image_size
  sizes = F.BatchSizes(image_res=res, patch_size=cfg.vision.patch_size,
                       max_tokens=args.max_tokens, max_masks=args.max_masks,
                       image_batch=args.image_batch, region_batch=args.region_batch,
                       region_max_images=args.region_max_images if args.region_batch else 0,
                       video_batch=args.video_batch, frame_len=args.frame_len)
  mesh = sharding.make_mesh(_mesh_shape(args.mesh))
  options = ({"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
             if args.fast_compile else None)

  tx = optim.make_optimizer(optim.OptimConfig(total_steps=10_000, warmup_steps=0))
  t0 = time.perf_counter()
  state = step_jit.create_train_state(cfg, tx, mesh, jax.random.key(0, impl="rbg"),
                                      compiler_options=options)
  jax.block_until_ready(state.state)
  init_s = time.perf_counter() - t0
  batch = step_jit.put_batch(random_batch(sizes, vocab=cfg.text.vocab_size), mesh)
  step = step_jit.jit_train_step(state, tx, ts.StepConfig(), mesh, cfg, batch,
                                 compiler_options=options)
  key = jax.random.key(1)
  itm = not args.no_itm

  t0 = time.perf_counter()
  lowered = step.lower(state.state, batch, key, itm)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0

  st = state.state
  for i in range(args.warmup):
    st, metrics = compiled(st, batch, jax.random.fold_in(key, i))
  jax.block_until_ready(st)
  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    st, metrics = compiled(st, batch, jax.random.fold_in(key, 1000 + i))
    jax.block_until_ready((st, metrics))
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))

  flops = _flops(compiled)
  n_dev = mesh.devices.size
  mflops = flops_lib.step_flops(cfg, sizes, itm)
  examples = {F.IMAGE: args.image_batch, "region_texts": args.region_batch,
              "region_images": sizes.region_max_images, F.VIDEO: args.video_batch}
  out = {
      "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
      "num_devices": n_dev, "mesh": dict(mesh.shape),
      "variant": args.variant, "params": int(sum(np.prod(x.shape) for x in
                                                  jax.tree.leaves(st["params"]))),
      "dtype": args.dtype, "remat": args.remat, "itm": itm, "image_res": res,
      "max_tokens": args.max_tokens, "batch": {k: v for k, v in examples.items() if v},
      "fast_compile": args.fast_compile,
      "init_s": round(init_s, 2), "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
      "steps_timed": args.steps, "step_s": round(step_s, 4),
      "step_s_min": round(min(times), 4), "step_s_max": round(max(times), 4),
      "examples_per_s": {k: round(v / step_s, 3) for k, v in examples.items() if v},
      "model_flops_per_step": mflops,
      "model_tflops_per_s_per_device": round(mflops / n_dev / step_s / 1e12, 5),
      "mfu": (round(mflops / n_dev / step_s / (args.peak_tflops * 1e12), 4)
              if args.peak_tflops else None),
      "xla_flops_per_step_per_device": flops,  # scanned layers counted once: a lower bound
      "memory": _peak_memory(compiled, mesh.devices.flat),
      "loss": float(metrics["loss/total"]),
      "loss_finite": bool(np.isfinite(float(metrics["loss/total"]))),
  }
  print(json.dumps(out, indent=1))


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
