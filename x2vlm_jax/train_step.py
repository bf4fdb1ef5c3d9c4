"""One optimizer update of the train state (`train_state.py` layout), not yet jitted.

`make_train_step(spec, loss, accum_steps)` returns `step(state, batch, key, itm) ->
(state, metrics)`:
  * the ITC temperature is clamped first, as the official forward pass clamps it in place
    (docs/fidelity.md#temperature-clamp);
  * gradients of `loss(model, batch, key, itm) -> (scalar, metrics)`, averaged over the
    micro-batches when `accum_steps` > 1;
  * the optax update; an update whose loss or gradient norm is not finite is skipped: parameters
    and optimizer state stay bit-unchanged and the `nonfinite_*` counters move.
`step_jit.py` jits it for a mesh; `objectives.make_loss` is the pre-training loss.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.train_state import TrainStateSpec

# loss(model, batch, key, itm) -> (scalar loss, flat metrics dict)
LossFn = Callable[..., tuple[jax.Array, dict]]


def clamp_temp(params: dict, cfg: ModelConfig) -> dict:
  """`params` with `temp` clamped to [cfg.temp_min, cfg.temp_max] (0.001, 0.5). A model without
  `temp` (MVPTR: its `logit_scale` is never clamped in the official code) is returned as is."""
  if "temp" not in params:
    return params
  return {**params, "temp": jnp.clip(params["temp"], cfg.temp_min, cfg.temp_max)}


def _accumulated(grad_fn, params, batch, key, itm: bool, accum_steps: int):
  """(loss, metrics, grads) averaged over the [A] micro-batches of `batch` (one scan).

  Each micro-batch draws its ITC and ITM negatives from itself only, so A micro-batches of B
  are not one batch of A*B (docs/train_step.md).
  """

  def body(carry, xs):
    i, sub = xs
    (l, m), g = grad_fn(params, sub, jax.random.fold_in(key, i), itm)
    return jax.tree.map(jnp.add, carry, (l, m, g)), None

  shapes = jax.eval_shape(
    lambda p, b, k: grad_fn(p, b, k, itm), params, jax.tree.map(lambda x: x[0], batch), key
  )  # itm stays static
  zero = jax.tree.map(
    lambda x: jnp.zeros(x.shape, x.dtype), (shapes[0][0], shapes[0][1], shapes[1])
  )
  (loss, metrics, grads), _ = jax.lax.scan(body, zero, (jnp.arange(accum_steps), batch))
  return jax.tree.map(lambda x: x / accum_steps, (loss, metrics, grads))


def make_train_step(spec: TrainStateSpec, loss: LossFn, accum_steps: int = 1):
  """Returns step(state, batch, key, itm=True) -> (state, metrics); see the module docstring.

  With accum_steps = A > 1 every batch leaf carries a leading [A] axis of micro-batches.
  """
  tx = spec.tx

  def loss_of(params, batch, key, itm):
    return loss(spec.model(params), batch, key, itm)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def step(state, batch, key, itm: bool = True):
    params = clamp_temp(state["params"], spec.model_cfg)
    if accum_steps > 1:
      loss_value, metrics, grads = _accumulated(grad_fn, params, batch, key, itm, accum_steps)
    else:
      (loss_value, metrics), grads = grad_fn(params, batch, key, itm)
    # One reduction (the norm that clipping and the metric need anyway) instead of one
    # isfinite-reduction per parameter: fewer kernels to compile, same decision.
    l2_grads = optax.tree.norm(grads)
    finite = jnp.isfinite(loss_value) & jnp.isfinite(l2_grads)
    updates, new_opt = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
      "params": keep(new_params, state["params"]),
      "opt_state": keep(new_opt, state["opt_state"]),
      "step": state["step"] + 1,
      "nonfinite_run": jnp.where(finite, 0, state["nonfinite_run"] + 1),
      "nonfinite_total": state["nonfinite_total"] + (~finite).astype(jnp.int32),
    }
    metrics = dict(metrics)
    metrics["l2_grads"] = l2_grads
    metrics["l2_params"] = optax.tree.norm(params)
    metrics["update_skipped"] = (~finite).astype(jnp.float32)
    metrics["nonfinite_run"] = new_state["nonfinite_run"]
    metrics["nonfinite_total"] = new_state["nonfinite_total"]
    return new_state, metrics

  return step
