"""Remat policies per tower and unrolled layer loops (`scan_unroll`) give the gradients of no
remat in rolled loops (<= 1e-6 relative), and the bfloat16 compute policy keeps parameters,
optimizer state, softmax, LayerNorm statistics and losses in float32 (read from the traced
program), the loss within 5e-3 of float32 on the tiny model (measured 1.0e-3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_step_testlib import FAST_COMPILE

from data_pipelines import features as F
from data_pipelines.testing.random_batch import random_batch
from x2vlm_jax import objectives as pl
from x2vlm_jax import optim, sharding
from x2vlm_jax.models.config import ModelConfig, remat_fields
from x2vlm_jax.train_state import TrainStateSpec

SIZES = F.BatchSizes(image_res=64, max_tokens=8, max_masks=2, image_batch=4)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def params(mesh):
  spec = TrainStateSpec.build(ModelConfig.tiny(), optim.OptimConfig(total_steps=10), mesh)
  return spec.init(jax.random.key(0, impl="rbg"), compiler_options=FAST_COMPILE)["params"]


def _spec(cfg, mesh):
  return TrainStateSpec.build(cfg, optim.OptimConfig(total_steps=10), mesh)


def _tower_grads(cfg, mesh, params, jaxpr=False):
  """Gradients of a loss through all three towers, dropout and drop path active (or, with
  `jaxpr`, the traced gradient program)."""
  spec = _spec(cfg, mesh)
  pixels = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)), jnp.uint8)
  ids = jnp.asarray(np.random.default_rng(1).integers(1, 500, (3, 6)), jnp.int32)
  mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3], jnp.int32)
  vmask = jnp.ones((3, 17), jnp.int32).at[1, 5:].set(0)
  keys = jax.random.split(jax.random.key(7), 3)

  def loss(p):
    m = spec.model(p)
    vision = m.encode_image(pixels, keys[0])
    text = m.encode_text(ids, mask, keys[1])
    fused = m.fuse(text, mask, vision, vmask, jnp.asarray([0, 1, 1]), keys[2])
    return jnp.sum(jnp.sin(fused.astype(jnp.float32)))

  if jaxpr:
    return jax.make_jaxpr(jax.grad(loss))(params)
  return jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)


def test_remat_policies_and_unrolled_loops_keep_gradients(mesh, params):
  ref = _tower_grads(ModelConfig.tiny(), mesh, params)
  # One compile covers three policies, one per tower ("full" is nnx.remat's own default), and
  # the layer loops unrolled.
  fields = remat_fields(True, "vision=save_matmuls,text=save_all_but_attention,fusion=save_dots")
  cfg = ModelConfig.tiny(**fields, scan_unroll=True)
  traced = _eqns(_tower_grads(cfg, mesh, params, jaxpr=True).jaxpr)
  # Every layer loop, forward and backward, unrolled: jax records True as the depth (2).
  unrolls = [e.params["unroll"] for e in traced if e.primitive.name == "scan"]
  assert len(unrolls) == 6 and set(unrolls) == {2}, unrolls
  assert [cfg.tower_remat(t) for t in ("vision", "text", "fusion")] == [
    "save_matmuls",
    "save_all_but_attention",
    "save_dots",
  ]
  # Towers not named follow `remat`; a bare policy applies to every tower.
  assert ModelConfig.tiny(**remat_fields(True, "vision=none")).tower_remat("text") is True
  assert ModelConfig.tiny(**remat_fields(False, "save_dots")).tower_remat("fusion") == "save_dots"
  flat_ref = jax.tree.leaves(ref)
  got = jax.tree.leaves(_tower_grads(cfg, mesh, params))
  norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in flat_ref))
  diff = np.sqrt(sum(float(np.sum(np.square(a - b))) for a, b in zip(flat_ref, got)))
  assert diff / norm <= 1e-6, diff / norm
  # Every leaf against its own largest entry (unused heads have zero gradients: floor).
  floor = 1e-4 * max(float(np.abs(g).max()) for g in flat_ref)
  worst = max(
    float(np.abs(a - b).max()) / max(float(np.abs(a).max()), floor) for a, b in zip(flat_ref, got)
  )
  assert worst <= 1e-5, worst


def test_remat_rejects_unknown_policy():
  from x2vlm_jax.models.x2vlm import abstract_model

  with pytest.raises(ValueError, match="'sometimes' is not one of"):
    abstract_model(ModelConfig.tiny(remat_text="sometimes"))
  with pytest.raises(ValueError, match="'audio=full'"):
    remat_fields(False, "audio=full")


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its equations (scan, remat, jit)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def test_bfloat16_policy(mesh, params):
  cfg = ModelConfig.tiny(dtype=jnp.bfloat16)
  spec = _spec(cfg, mesh)
  state = jax.eval_shape(lambda k: spec.init(k), jax.random.key(0, impl="rbg"))
  floats = [x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert len(floats) > 100 and set(floats) == {jnp.dtype(jnp.float32)}  # params + Adam mu, nu

  batch = jax.tree.map(jnp.asarray, random_batch(SIZES, vocab=cfg.text.vocab_size, seed=0))
  loss = pl.make_loss(pl.StepConfig(), mesh)
  key = jax.random.key(3)
  closed = jax.make_jaxpr(lambda p: loss(spec.model(p), batch, key, True))(params)
  eqns = list(_eqns(closed.jaxpr))
  dtype_of = lambda v: jnp.dtype(v.aval.dtype)
  by_prim = lambda name: [e for e in eqns if e.primitive.name == name]
  f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
  # Softmax, log-softmax and logsumexp (attention, ITC, ITM, MLM) exponentiate in float32.
  assert by_prim("exp") and {dtype_of(e.outvars[0]) for e in by_prim("exp")} == {f32}
  # LayerNorm statistics: every rsqrt in float32.
  assert by_prim("rsqrt") and {dtype_of(e.outvars[0]) for e in by_prim("rsqrt")} == {f32}
  # Matmuls in bfloat16 (measured: 35 of 37; the float32 ones are the ITC similarities).
  dots = by_prim("dot_general")
  n_bf16 = sum(all(dtype_of(v) == bf16 for v in e.invars) for e in dots)
  assert n_bf16 >= 0.9 * len(dots), (n_bf16, len(dots))
  # The loss and every metric come out float32.
  assert {dtype_of(v) for v in closed.jaxpr.outvars if hasattr(v, "aval")} == {f32}

  fwd = lambda c: jax.jit(
    lambda p: loss(_spec(c, mesh).model(p), batch, key, False)[0], compiler_options=FAST_COMPILE
  )(params)
  l32, l16 = float(fwd(ModelConfig.tiny())), float(fwd(cfg))
  print(f"loss float32 {l32:.6f}, bfloat16 {l16:.6f}")
  assert np.isfinite(l16) and abs(l16 - l32) <= 5e-3 * abs(l32), (l32, l16)


def test_model_keeps_params_float32_in_bf16():
  from x2vlm_jax.models.x2vlm import abstract_model

  state = nnx.state(abstract_model(ModelConfig.tiny(dtype=jnp.bfloat16)), nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}


def test_resume_ignores_attention_remat_policy_and_unroll():
  """Old checkpoints (saved before these keys existed) resume; changing them is allowed; the
  model section stays critical otherwise."""
  from x2vlm_jax import ckpt_config, run_config

  new = {
    "model": {
      "variant": "tiny",
      "remat": False,
      "attention": "xla",
      "remat_policy": "full",
      "scan_unroll": 2,
    },
    "_model_resolved": {"remat": False, "attention": "xla", "remat_text": "full", "scan_unroll": 2},
  }
  old = {"model": {"variant": "tiny", "remat": False}, "_model_resolved": {"remat": False}}
  assert run_config.resume_check(new, False)(old) == []
  changed = {**old, "model": {"variant": "base", "remat": False}}
  with pytest.raises(ckpt_config.ConfigChangedError, match="model.variant"):
    run_config.resume_check(new, False)(changed)


def test_save_all_but_attention_wraps_only_the_attention_core():
  """The policy leaves the layer unrematerialised and checkpoints the attention core alone (its
  logits and probabilities are recomputed; base vision tower, batch 8: XLA temp 2.27 -> 1.93 GB,
  docs/benchmarks.md)."""
  from x2vlm_jax.models.config import VisionConfig
  from x2vlm_jax.models.vision import VisionTower

  cfg = VisionConfig(width=36, depth=2, num_heads=3, mlp_dim=52, image_size=64)
  x = jnp.zeros((2, 64, 64, 3), jnp.float32)

  def remat_eqns(policy):
    gd, st = nnx.split(nnx.eval_shape(lambda: VisionTower(cfg, remat=policy, rngs=nnx.Rngs(0))))
    grad = jax.grad(lambda p: jnp.sum(nnx.merge(gd, p)(x)))
    eqns = list(_eqns(jax.make_jaxpr(grad)(st).jaxpr))
    return [e for e in eqns if e.primitive.name in ("checkpoint", "remat", "remat2")]

  assert remat_eqns("none") == []
  wrapped = remat_eqns("save_all_but_attention")
  assert wrapped and all(
    {e.primitive.name for e in _eqns(w.params["jaxpr"])} & {"exp"} for w in wrapped
  )
  # The whole layer under "full": its checkpoint also holds the MLP's GELU (erfc).
  full = remat_eqns("full")
  assert any("erfc" in {e.primitive.name for e in _eqns(w.params["jaxpr"])} for w in full)
  assert not any("erfc" in {e.primitive.name for e in _eqns(w.params["jaxpr"])} for w in wrapped)
