"""The train step jitted for a mesh: the one way the trainer, the benchmark and the tests run it.

`JittedStep(spec, step)` jits `step(state, batch, key, itm)` (`train_step.make_train_step`)
with the state's shardings in and out (the input state donated: its buffers become the new
state's), the batch split over the mesh's batch shards (axis 1 under gradient accumulation,
whose axis 0 is the micro-batch), the key replicated and `itm` static. It compiles ahead of time
on first use of each `itm` value, with the mesh set as the ambient mesh while tracing so the
model's activation constraints (`layers.constrain`) are active.

`task_step(spec, task, step_cfg, accum_steps)` is the trainer's step of a task built that way
(`pretrain_step` the pre-training one: the benchmark and the tests use it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from x2vlm_jax import global_batch, objectives, tasks, train_step
from x2vlm_jax.train_state import TrainStateSpec

# XLA CPU options that trade step speed for compile time: no LLVM backend optimisation and the
# classic (non-emitter) fusion code paths; `train.fast_compile` (docs/benchmarks.md figures).
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


# XLA CPU options of the step otherwise: region analysis in copy insertion drops copies of
# loop-carried buffers (the stacked layer parameters and saved activations of the layer scans)
# that XLA CPU inserts by default: 1,109 -> 677 copies in the optimised official-tiny step, a
# few % of its time (docs/benchmarks.md#cpu-tuning). Changes no number.
CPU_STEP_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def compile_options(fast: bool) -> dict | None:
  """The step's XLA options: on CPU FAST_CPU_COMPILE when asked for, else CPU_STEP_OPTIONS;
  XLA's defaults on other backends."""
  if jax.default_backend() != "cpu":
    return None
  return dict(FAST_CPU_COMPILE) if fast else dict(CPU_STEP_OPTIONS)


class JittedStep:
  """`step(state, batch, key, itm=True) -> (state, metrics)`, jitted for `spec.mesh`.

  Args:
    spec: the train state's layout (its shardings are the step's state shardings).
    step: the pure step function.
    accum_steps: micro-batches per update (> 1: every batch leaf is [A, B, ...]).
    donate: reuse the input state's buffers for the output state.
    compiler_options: XLA options (e.g. the fast-compiling CPU options of the tests).
    on_compile: called with (itm, seconds) after each compilation.
  """

  def __init__(
    self,
    spec: TrainStateSpec,
    step: Callable,
    accum_steps: int = 1,
    *,
    donate: bool = True,
    compiler_options: dict | None = None,
    on_compile: Callable[[bool, float], None] | None = None,
  ):
    self.spec, self.step, self.accum_steps = spec, step, accum_steps
    self.donate, self.compiler_options, self.on_compile = donate, compiler_options, on_compile
    self._jitted = None
    self._compiled: dict[bool, object] = {}

  def _jit(self, batch: Mapping):
    if self._jitted is None:
      mesh = self.spec.mesh
      replicated = NamedSharding(mesh, P())
      batch_sh = global_batch.shardings(batch, mesh, 1 if self.accum_steps > 1 else 0)
      self._jitted = jax.jit(
        self.step,
        in_shardings=(self.spec.shardings, batch_sh, replicated),
        out_shardings=(self.spec.shardings, replicated),
        static_argnums=(3,),
        donate_argnums=(0,) if self.donate else (),
        compiler_options=self.compiler_options,
      )
    return self._jitted

  def lower(self, state, batch, key, itm: bool = True):
    """The traced step (`jax.stages.Lowered`) for these arguments (arrays or
    ShapeDtypeStructs), e.g. for cost analysis."""
    with jax.set_mesh(self.spec.mesh):
      return self._jit(batch).lower(state, batch, key, itm)

  def compiled(self, state, batch, key, itm: bool = True):
    """The compiled step for `itm` (compiled on first request)."""
    if itm not in self._compiled:
      t0 = time.perf_counter()
      self._compiled[itm] = self.lower(state, batch, key, itm).compile()
      if self.on_compile is not None:
        self.on_compile(itm, time.perf_counter() - t0)
    return self._compiled[itm]

  def __call__(self, state, batch, key, itm: bool = True):
    return self.compiled(state, batch, key, itm)(state, batch, key)

  @property
  def compiled_variants(self) -> tuple[bool, ...]:
    """The `itm` values compiled so far."""
    return tuple(self._compiled)


def task_step(
  spec: TrainStateSpec, task, step_cfg: objectives.StepConfig, accum_steps: int = 1, **kwargs
) -> JittedStep:
  """The train step of `task` (`tasks.Task`) for `spec`: the trainer's step."""
  loss = task.make_loss(step_cfg, spec.mesh)
  return JittedStep(
    spec, train_step.make_train_step(spec, loss, accum_steps), accum_steps, **kwargs
  )


def pretrain_step(
  spec: TrainStateSpec, step_cfg: objectives.StepConfig, accum_steps: int = 1, **kwargs
) -> JittedStep:
  """The pre-training step of `spec` (`task_step` of the 'pretrain' task)."""
  return task_step(spec, tasks.TASKS["pretrain"], step_cfg, accum_steps, **kwargs)
