"""HF-style AdamW chain vs a NumPy transcription of the official update, and the official schedule.

The official rules: docs/fidelity.md#hf-adamw, docs/fidelity.md#linear-warm-up-and-decay.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from x2vlm_jax import optim, treepath

# path -> (lr factor, weight decay) expected with fresh = {temp, itm_head}, lr_mult 2.
EXPECTED = {
  "vision.blocks.gamma_1": (1.0, 0.01),
  "vision.blocks.norm1.scale": (1.0, 0.0),
  "vision.blocks.norm1.bias": (1.0, 0.0),
  "itm_head.norm.scale": (2.0, 0.01),
  "itm_head.norm.bias": (2.0, 0.0),
  "temp": (2.0, 0.01),
}


def _flat(tree):
  return {p: np.asarray(v, np.float64) for p, v in treepath.flatten(tree)}


def np_hf_adamw(params, grads_per_step, cfg, groups):
  """NumPy float64: torch-style clip, HF AdamW (eps on raw sqrt(v), decay after), LambdaLR."""
  p = {k: v.copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  n, w = cfg.total_steps, cfg.num_warmup
  for step, grads in enumerate(grads_per_step):
    norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
    scale = min(1.0, cfg.clip_norm / (norm + 1e-6))  # torch clip_grad_norm_
    factor = step / w if step < w else max(0.0, (n - step) / (n - w))
    t = step + 1
    for k in p:
      g = grads[k] * scale
      m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g
      v2[k] = cfg.b2 * v2[k] + (1 - cfg.b2) * g * g
      lr = cfg.lr * factor * groups[k][0]
      step_size = lr * np.sqrt(1 - cfg.b2**t) / (1 - cfg.b1**t)
      p[k] = p[k] - step_size * m[k] / (np.sqrt(v2[k]) + cfg.eps)
      p[k] = p[k] - lr * groups[k][1] * p[k]
  return p


def test_matches_numpy_hf_adamw_and_first_step_is_zero():
  cfg = optim.OptimConfig(lr=0.05, total_steps=6, warmup_steps=2)  # large lr: visible decay
  rng = np.random.default_rng(0)
  shapes = {k: (3,) if k != "temp" else () for k in EXPECTED}
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  params["temp"] = np.float32(0.07)
  # Step 1 has a global norm above 1 (clipped), the others below.
  grads = [
    {k: (rng.normal(size=s) * sc).astype(np.float32) for k, s in shapes.items()}
    for sc in (0.1, 2.0, 0.05, 0.3)
  ]
  tx = optim.make_optimizer(cfg, fresh_paths=["temp", "itm_head"])
  tree = treepath.unflatten_dict(params)
  state = tx.init(tree)
  step = jax.jit(tx.update)
  history = []
  for g in grads:
    updates, state = step(treepath.unflatten_dict(g), state, tree)
    tree = optax.apply_updates(tree, updates)
    history.append(_flat(tree))
  # The first update uses lr 0, so nothing moves (not even by weight decay).
  for k, v in history[0].items():
    np.testing.assert_array_equal(v, params[k])
  ref = np_hf_adamw(
    {k: np.asarray(v, np.float64) for k, v in params.items()},
    [{k: np.asarray(v, np.float64) for k, v in g.items()} for g in grads],
    cfg,
    EXPECTED,
  )
  got = history[-1]
  for k in EXPECTED:
    np.testing.assert_allclose(got[k], ref[k], rtol=2e-6, atol=1e-7, err_msg=k)
  # The comparison is not vacuous: the parameters did move.
  assert not np.allclose(got["vision.blocks.gamma_1"], params["vision.blocks.gamma_1"])


def test_eps_on_uncorrected_sqrt_v():
  """One step with a tiny gradient: HF direction = sqrt(1-b2)/(1-b1) * m / (sqrt(v) + eps)."""
  tx = optim.scale_by_hf_adam(0.9, 0.98, 1e-8)
  g = {"w": jnp.array([1e-8, 1.0])}
  d, _ = tx.update(g, tx.init(g))
  m, v = 0.1 * np.array([1e-8, 1.0]), 0.02 * np.array([1e-16, 1.0])
  ref = np.sqrt(0.02) / 0.1 * m / (np.sqrt(v) + 1e-8)
  np.testing.assert_allclose(d["w"], ref, rtol=1e-6)
  opt, _ = optax.scale_by_adam(0.9, 0.98, 1e-8).update(
    g, optax.scale_by_adam(0.9, 0.98, 1e-8).init(g)
  )
  assert abs(float(d["w"][0]) - float(opt["w"][0])) > 0.1  # not optax's formula


def test_schedule_values():
  cfg = optim.OptimConfig(lr=1e-4, total_steps=100, warmup_steps=10)
  f = optim.lr_factor_schedule(cfg)
  for step, want in [(0, 0.0), (5, 0.5), (10, 1.0), (55, 0.5), (100, 0.0), (130, 0.0)]:
    np.testing.assert_allclose(f(step), want, atol=1e-7, err_msg=str(step))
  np.testing.assert_allclose(optim.lr_schedule(cfg)(10), 1e-4, rtol=1e-6)
  # Fractional warm-up (fine-tuning configs) and no warm-up.
  assert optim.OptimConfig(total_steps=100, warmup_steps=0.1).num_warmup == 10
  np.testing.assert_allclose(optim.lr_factor_schedule(optim.OptimConfig(total_steps=4))(1), 0.75)
  # min_lr floors the decay phase only.
  g = optim.lr_factor_schedule(
    optim.OptimConfig(lr=1e-4, min_lr=1e-5, total_steps=100, warmup_steps=10)
  )
  np.testing.assert_allclose([g(0), g(5), g(100)], [0.0, 0.5, 0.1], atol=1e-7)
  with pytest.raises(ValueError, match="warmup"):
    optim.OptimConfig(total_steps=5, warmup_steps=10)


class _Head(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(3, 5, rngs=rngs)
    self.norm = nnx.LayerNorm(5, rngs=rngs)
    self.fc2 = nnx.Linear(5, 2, rngs=rngs)


class _Tiny(nnx.Module):
  def __init__(self, rngs):
    self.itm_head = _Head(rngs)
    self.temp = nnx.Param(jnp.array(0.07))

  def __call__(self, x):
    h = self.itm_head
    return h.fc2(jax.nn.gelu(h.norm(h.fc1(x)), approximate=False)) / self.temp


def test_nnx_optimizer_uses_our_paths():
  """Through nnx.Optimizer (Variables in the state) the groups and numbers are the same."""
  cfg = optim.OptimConfig(lr=0.01, total_steps=10, warmup_steps=1)
  tx = optim.make_optimizer(cfg, fresh_paths=["temp"])
  model = _Tiny(nnx.Rngs(0))
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.linspace(-1, 1, 12).reshape(4, 3)
  loss = lambda m: jnp.mean(m(x) ** 2)

  @nnx.jit
  def train_step(model, opt):
    opt.update(model, nnx.grad(loss)(model))

  # The same chain on a plain dict of arrays.
  pstate = jax.tree.map(jnp.asarray, pure)
  ostate = tx.init(pstate)

  def loss_tree(p):
    m = _Tiny(nnx.Rngs(0))
    nnx.update(m, p)
    return loss(m)

  @jax.jit
  def tree_step(p, s):
    u, s = tx.update(jax.grad(loss_tree)(p), s, p)
    return optax.apply_updates(p, u), s

  for _ in range(3):
    train_step(model, opt)
    pstate, ostate = tree_step(pstate, ostate)
  got = dict(treepath.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
  for path, want in treepath.flatten(pstate):
    np.testing.assert_allclose(got[path], want, rtol=1e-6, atol=1e-8, err_msg=path)
  assert float(model.temp[...]) != 0.07


def test_bad_paths_fail_at_init():
  tree = {"vision": {"gamma_1": jnp.ones(3)}, "new_norm": {"scale": jnp.ones(3)}}
  with pytest.raises(ValueError, match="new_norm.scale"):
    optim.make_optimizer(optim.OptimConfig(total_steps=3)).init(tree)
  with pytest.raises(ValueError, match="itm_hed"):
    optim.make_optimizer(optim.OptimConfig(total_steps=3), ["itm_hed"]).init(
      {"vision": {"gamma_1": jnp.ones(3)}}
    )


def test_clip_like_torch():
  """coef = max / (norm + eps), applied only when < 1 (eps exaggerated to make it visible)."""
  tx = optim.clip_by_global_norm(1.0, eps=0.5)
  g = {"a": jnp.array([1.2, 0.0]), "b": jnp.array([1.6])}  # global norm 2
  out, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(out["a"], [1.2 / 2.5, 0.0], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [1.6 / 2.5], rtol=1e-6)
  small = {"a": jnp.array([0.3, 0.0]), "b": jnp.array([0.4])}  # norm 0.5: untouched
  out, _ = tx.update(small, tx.init(small))
  np.testing.assert_allclose(out["b"], [0.4])
