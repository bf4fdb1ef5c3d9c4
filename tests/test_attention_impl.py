"""`ModelConfig.attention`: the `jax.nn.dot_product_attention` paths give the einsum path's
outputs and gradients (float32 <= 1e-5 relative; bfloat16 within 2e-2), on the vision tower
(relative position bias), the text tower (padding) and the fusion tower (padded vision tokens,
K/V gathered per text row); and the fallbacks (dropout, cuDNN off GPU / fp32 / odd lengths)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from x2vlm_jax.models import attention
from x2vlm_jax.models.config import FusionConfig, ModelConfig, TextConfig, VisionConfig
from x2vlm_jax.models.fusion import FusionTower
from x2vlm_jax.models.text import TextTower
from x2vlm_jax.models.vision import VisionTower

FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
VISION = VisionConfig(width=36, depth=2, num_heads=3, mlp_dim=52, image_size=64)
TEXT = TextConfig(width=40, depth=2, num_heads=4, mlp_dim=56, max_positions=64, vocab_size=100)
FUSION = FusionConfig(depth=2, num_heads=4, mlp_dim=56)
RNG = np.random.default_rng(0)


def _towers(impl: str, dtype):
  kw = dict(attention=impl, dtype=dtype)
  return {
    "vision": lambda r: VisionTower(VISION, rngs=r, **kw),
    "text": lambda r: TextTower(TEXT, rngs=r, **kw),
    "fusion": lambda r: FusionTower(FUSION, TEXT, VISION.width, rngs=r, **kw),
  }


def _state(name: str):
  """The tower's parameters (einsum build), the vision tower's bias tables made non-zero."""
  make = _towers("einsum", jnp.float32)[name]
  init = jax.jit(lambda k: nnx.state(make(nnx.Rngs(params=k))), compiler_options=FAST)
  state = init(jax.random.key(3, impl="rbg"))
  if name == "vision":
    pure = nnx.to_pure_dict(state)
    table = pure["blocks"]["attn"]["rel_pos_bias"]
    pure["blocks"]["attn"]["rel_pos_bias"] = jnp.asarray(RNG.normal(0, 1, table.shape), jnp.float32)
    nnx.replace_by_pure_dict(state, pure)
  return state


INPUTS = {
  "vision": (jnp.asarray(RNG.normal(0, 1, (2, 64, 64, 3)), jnp.float32),),
  "text": (
    jnp.asarray(RNG.integers(1, 100, (3, 7)), jnp.int32),
    jnp.asarray([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], jnp.int32),
  ),
  "fusion": (
    jnp.asarray(RNG.normal(0, 1, (3, 7, 40)), jnp.float32),
    jnp.asarray([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], jnp.int32),
    jnp.asarray(RNG.normal(0, 1, (2, 17, 36)), jnp.float32),
    jnp.asarray([[1] * 17, [1] * 9 + [0] * 8, [1, 0] * 8 + [1]], jnp.int32),
    jnp.asarray([0, 1, 1], jnp.int32),
  ),
}


def _run(name: str, impl: str, dtype, state):
  """(output, gradient of sum(output * w) w.r.t. the parameters) with implementation `impl`."""
  abstract = nnx.eval_shape(lambda: _towers(impl, dtype)[name](nnx.Rngs(0)))
  graphdef = nnx.split(abstract)[0]
  inputs = INPUTS[name]

  def loss(params):
    out = nnx.merge(graphdef, params)(*inputs).astype(jnp.float32)
    w = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return jnp.sum(out * w), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST)(state)
  return np.asarray(out), jax.tree.map(np.asarray, grads)


def _rel_err(a, b, floor: float = 1e-30) -> float:
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), floor))


def _grad_errs(g_a, g_b) -> list[float]:
  """Per-leaf relative error; a leaf whose true gradient is zero (the key bias: softmax ignores
  a constant per query) is measured against 1e-4 of the largest gradient, not its own noise."""
  floor = 1e-4 * max(float(np.abs(x).max()) for x in jax.tree.leaves(g_a))
  return jax.tree.leaves(jax.tree.map(lambda a, b: _rel_err(a, b, floor), g_a, g_b))


@pytest.mark.parametrize("name", ["vision", "text", "fusion"])
def test_xla_path_matches_einsum_float32(name):
  state = _state(name)
  out_e, g_e = _run(name, "einsum", jnp.float32, state)
  out_x, g_x = _run(name, "xla", jnp.float32, state)
  assert _rel_err(out_e, out_x) <= 1e-5
  errs = _grad_errs(g_e, g_x)
  assert len(errs) > 10 and max(errs) <= 1e-5, max(errs)
  if name == "vision":  # the relative position bias does receive a gradient
    assert np.abs(g_e["blocks"]["attn"]["rel_pos_bias"]).max() > 0


def test_xla_path_matches_einsum_bfloat16():
  state = _state("vision")
  out_e, g_e = _run("vision", "einsum", jnp.bfloat16, state)
  out_x, g_x = _run("vision", "xla", jnp.bfloat16, state)
  assert _rel_err(out_e, out_x) <= 2e-2
  # bf16 rounding of the probabilities differs in place, so gradients agree to bf16 precision
  # in aggregate (norm of the difference over norm of the gradient, per leaf).
  rel = lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
  assert max(jax.tree.leaves(jax.tree.map(rel, g_e, g_x))) <= 2e-2


def _shape(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_fallbacks():
  q, k = _shape(2, 40, 12, 64, dtype=jnp.bfloat16), _shape(2, 40, 12, 64, dtype=jnp.bfloat16)
  bias = _shape(2, 1, 1, 40)
  assert attention.resolve("cudnn", q, k, bias, False, "gpu") == ("cudnn", "")
  assert attention.resolve("xla", q, k, bias, False, "cpu") == ("xla", "")
  used, why = attention.resolve("cudnn", q, k, bias, False, "cpu")
  assert used == "xla" and "cpu" in why
  used, why = attention.resolve("xla", q, k, bias, True, "gpu")
  assert used == "einsum" and "dropout" in why
  odd = _shape(2, 197, 12, 64, dtype=jnp.bfloat16)  # the vision tower at 224 px: 1 + 14 x 14
  assert attention.resolve("cudnn", odd, odd, bias, False, "gpu")[0] == "xla"
  assert attention.resolve("cudnn", odd, odd, None, False, "gpu")[0] == "cudnn"
  f32 = _shape(2, 40, 12, 64)
  assert "float32" in attention.resolve("cudnn", f32, f32, None, False, "gpu")[1]
  dh = _shape(2, 40, 3, 12, dtype=jnp.bfloat16)  # tiny's head dim 12 is not a multiple of 8
  assert "head dim" in attention.resolve("cudnn", dh, dh, None, False, "gpu")[1]
  with pytest.raises(ValueError, match="flash"):
    attention.check_impl("flash")


def test_model_config_rejects_unknown_implementation():
  from x2vlm_jax.models.x2vlm import abstract_model

  with pytest.raises(ValueError, match="'flash' is not one of"):
    abstract_model(ModelConfig.tiny(attention="flash"))
