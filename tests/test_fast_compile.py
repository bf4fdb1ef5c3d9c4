"""`train.fast_compile`: the config switch reaches the step's XLA options, and XLA accepts both
sets (an unknown option name would fail only at the first compile of a real run)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from x2vlm_jax import run_config as rc
from x2vlm_jax import step_jit


def test_switch_reaches_the_compile_options():
  c = tiny.get_config()
  assert rc.loop_config(c).fast_compile is False
  assert step_jit.compile_options(False) == step_jit.CPU_STEP_OPTIONS  # the tests run on CPU
  c.train.fast_compile = True
  assert rc.loop_config(c).fast_compile is True
  assert step_jit.compile_options(True) == step_jit.FAST_CPU_COMPILE


@pytest.mark.parametrize("fast", [True, False])
def test_xla_accepts_the_options(fast):
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(), compiler_options=step_jit.compile_options(fast))
  x = np.arange(12.0, dtype=np.float32).reshape(3, 4) / 10
  np.testing.assert_allclose(f(x), np.tanh(x @ x.T).sum(), rtol=1e-6)
