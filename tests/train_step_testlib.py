"""Shared helpers of the train-step tests: fast CPU compilation and a jitted parameter init.

Compile time dominates these tests on a 2-core CPU. Two XLA CPU options cut it ~5x without
changing any result the tests check (they select how kernels are generated, not what they
compute): backend optimisation level 0 (no LLVM optimisation of the generated kernels) and the
classic elemental emitters instead of the newer fusion emitters. Measured on the tiny model's
value-and-grad: 26.6 s -> 10.8 s; full step of three kinds: 79 s -> 16.5 s (docs/train_step.md).
"""

import jax
from flax import nnx

from x2vlm_jax.models.x2vlm import X2VLM

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def init_params(cfg, seed: int) -> dict:
  """Parameters as a pure dict, built in one jitted call (eager init compiles op by op).

  The 'rbg' key implementation generates random bits with one XLA op instead of a threefry
  kernel per parameter, which makes this init compile several times faster.
  """
  def init(key):
    return nnx.to_pure_dict(nnx.state(X2VLM(cfg, rngs=nnx.Rngs(params=key)), nnx.Param))
  return jax.jit(init, compiler_options=FAST_COMPILE)(jax.random.key(seed, impl="rbg"))
