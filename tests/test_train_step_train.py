"""50 steps of the tiny model on mixed batches through the trainer's jitted step (`step_jit`).

One compile serves the whole test: the state is born sharded on a (data=2, fsdp=2, tensor=2)
mesh, the step is jitted with state in/out shardings, a donated state and a static `itm` flag.
Checked: every loss term of every kind goes down, nothing is NaN outside the poisoned step, no
recompilation after the first step, the state keeps its shardings, and a NaN injected at one
step (a test-only wrapper of the step) skips exactly that update (parameters and optimizer
state bit-unchanged) without stopping training.
"""

import dataclasses
import time

import jax
import numpy as np
import pytest
from train_step_testlib import FAST_COMPILE, nan_at_step

from data_pipelines import features as F
from data_pipelines.testing.random_batch import random_batch
from x2vlm_jax import global_batch, optim, sharding, step_jit, treepath
from x2vlm_jax import objectives as pl
from x2vlm_jax import train_step as ts
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.train_state import TrainStateSpec

STEPS, NAN_STEP, POOL = 50, 31, 2
SIZES = F.BatchSizes(
  image_res=64,
  max_tokens=12,
  max_masks=4,
  image_batch=4,
  region_batch=4,
  region_max_images=4,
  video_batch=4,
  frame_len=2,
)
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def run():
  base = ModelConfig.tiny(frame_len=SIZES.frame_len)
  cfg = base.replace(text=dataclasses.replace(base.text, vocab_size=1200))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  spec = TrainStateSpec.build(
    cfg, optim.OptimConfig(lr=3e-3, total_steps=2 * STEPS, warmup_steps=3), mesh
  )
  state = spec.init(jax.random.key(0, impl="rbg"), compiler_options=FAST_COMPILE)
  # A small pool of fixed synthetic batches, cycled: the model can fit them, so every term
  # (ITC and ITM included) has something to learn in 50 steps.
  pool = [
    global_batch.put([random_batch(SIZES, vocab=cfg.text.vocab_size, seed=s)], mesh)
    for s in range(POOL)
  ]
  inner = ts.make_train_step(spec, pl.make_loss(pl.StepConfig(), mesh))
  step = step_jit.JittedStep(spec, nan_at_step(inner, NAN_STEP), compiler_options=FAST_COMPILE)

  compiles = []
  listener = lambda event, duration, **kw: (
    compiles.append(duration) if event == COMPILE_EVENT else None
  )
  jax.monitoring.register_event_duration_secs_listener(listener)
  history, after_first, snapshots = [], None, {}
  st = state
  key = jax.random.key(1)
  times = []
  try:
    for i in range(STEPS):
      t0 = time.perf_counter()
      if i == NAN_STEP:
        snapshots["before"] = jax.device_get({"params": st["params"], "opt": st["opt_state"]})
      st, metrics = step(st, pool[i % POOL], jax.random.fold_in(key, i))
      history.append(jax.device_get(metrics))
      times.append(time.perf_counter() - t0)
      if i == NAN_STEP:
        snapshots["after"] = jax.device_get({"params": st["params"], "opt": st["opt_state"]})
      if i == 0:
        after_first = len(compiles)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  print(f"first step (compile + run) {times[0]:.1f} s, then {np.median(times[1:]):.3f} s/step")
  return dict(
    history=history,
    compiles=compiles,
    after_first=after_first,
    state=st,
    shardings=spec.shardings,
    snapshots=snapshots,
  )


def test_every_loss_term_decreases(run):
  h = run["history"]
  terms = [k for k in h[0] if k.startswith("loss/")]
  assert len(terms) == 3 * 3 + 2 + 1  # itc/itm/mlm per kind, two box terms, the total
  change = {}
  for name in terms:  # mean over the first / last two passes through the pool
    first = np.mean([m[name] for m in h[: POOL * 2]])
    last = np.mean([m[name] for m in h[-POOL * 2 :]])
    change[name] = (round(float(first), 4), round(float(last), 4))
  print("first -> last:", change)
  assert all(last < 0.9 * first for first, last in change.values()), change


def test_nothing_is_nan_and_one_update_skipped(run):
  for i, m in enumerate(run["history"]):
    for name, value in m.items():
      if i == NAN_STEP and (name == "l2_grads" or name.startswith("loss/")):
        continue  # the poisoned batch: loss and gradients are NaN
      assert np.isfinite(value), (i, name, value)
    assert m["update_skipped"] == (1.0 if i == NAN_STEP else 0.0), i
  before, after = run["snapshots"]["before"], run["snapshots"]["after"]
  jax.tree.map(np.testing.assert_array_equal, before, after)
  st = run["state"]
  assert int(st["step"]) == STEPS and int(st["nonfinite_total"]) == 1
  assert int(st["nonfinite_run"]) == 0
  assert not np.isfinite(run["history"][NAN_STEP]["l2_grads"])


def test_compiled_once(run):
  assert run["after_first"] >= 1, "the listener saw no compilation at all"
  assert len(run["compiles"]) == run["after_first"], (
    f"{len(run['compiles']) - run['after_first']} compilation(s) after the first step"
  )


def test_state_keeps_its_shardings(run):
  arrays = treepath.flatten(run["state"])
  for (path, want), (_, x) in zip(treepath.flatten(run["shardings"]), arrays):
    assert x.sharding.is_equivalent_to(want, x.ndim), path
  # Adam moments are split like their parameter (here: the vocabulary over 'tensor').
  mu = run["state"]["opt_state"][1].mu["text"]["embeddings"]["word"]
  assert mu.sharding.spec == run["shardings"]["params"]["text"]["embeddings"]["word"].spec
  assert "tensor" in str(mu.sharding.spec)
