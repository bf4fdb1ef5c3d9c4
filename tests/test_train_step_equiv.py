"""The pre-training loss and its gradients: K/V-reuse vs naive, and every mesh vs one device.

One tiny model and one mixed batch (image + region + video) sized for 8 devices. The reference is
the production path (`loss_fn`, one call per tower, K/V reused) on a single device; it is
compared with
  * the naive path (`train_step_testlib.naive_loss_fn`: every kind on its own, K/V recomputed
    per pass, the official structure),
  * the same production path jitted on meshes (data=8), (data=2, fsdp=4), (fsdp=4, tensor=2)
    with parameters sharded by their logical names and the batch over ('data', 'fsdp').
Negatives are drawn with a fixed key from the whole batch (`neg_shards=1`), so every run sees
the same pairs. Compiled with `FAST_COMPILE` (see `train_step_testlib`): these tests check
numbers, not speed.
"""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from train_step_testlib import FAST_COMPILE, init_params, naive_loss_fn

from data_pipelines import features as F
from data_pipelines.testing.random_batch import random_batch
from x2vlm_jax import global_batch, optim, sharding, treepath
from x2vlm_jax import objectives as pl
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.train_state import TrainStateSpec

SIZES = F.BatchSizes(
  image_res=64,
  max_tokens=12,
  max_masks=4,
  image_batch=8,
  region_batch=8,
  region_max_images=8,
  video_batch=8,
  frame_len=2,
)
STEP_CFG = pl.StepConfig(deterministic=True, neg_shards=1)
MESHES = [{"data": 8}, {"data": 2, "fsdp": 4}, {"fsdp": 4, "tensor": 2}]


def _model_cfg():
  base = ModelConfig.tiny(frame_len=SIZES.frame_len)
  # A small vocabulary divisible by tensor=2 keeps the MLM head cheap and still sharded.
  return base.replace(text=dataclasses.replace(base.text, vocab_size=2000))


@pytest.fixture(scope="module")
def setup():
  cfg = _model_cfg()
  spec = TrainStateSpec.build(
    cfg, optim.OptimConfig(), sharding.make_mesh({"data": 1}, jax.devices()[:1])
  )
  params = init_params(cfg, 3)
  batch = global_batch.device_fields(
    random_batch(SIZES, vocab=cfg.text.vocab_size, seed=5, num_invalid=1)
  )
  key = jax.random.key(11)

  def value_and_grad(cfg_step, mesh, loss_fn=pl.loss_fn):
    def loss_of(p, b, k):
      return loss_fn(spec.model(p), b, k, cfg_step, mesh)

    return jax.value_and_grad(loss_of, has_aux=True)

  ref = jax.jit(value_and_grad(STEP_CFG, None), compiler_options=FAST_COMPILE)(params, batch, key)
  return dict(
    cfg=cfg,
    spec=spec,
    params=params,
    batch=batch,
    key=key,
    value_and_grad=value_and_grad,
    ref=jax.device_get(ref),
  )


def _compare(got, ref, loss_rtol, tree_rtol, leaf_rtol):
  """Loss, every metric, the whole gradient and each gradient leaf, relative to the reference.

  A leaf whose reference norm is below 1e-6 of the global gradient norm is held to the global
  bound only: the key-projection biases have an exactly zero gradient (softmax is invariant to a
  constant added to all logits of a query), so their ~1e-11 values are rounding noise.
  """
  (loss, metrics), grads = jax.device_get(got)
  (ref_loss, ref_metrics), ref_grads = ref
  np.testing.assert_allclose(loss, ref_loss, rtol=loss_rtol)
  assert set(metrics) == set(ref_metrics)
  for name in ref_metrics:
    np.testing.assert_allclose(
      metrics[name], ref_metrics[name], rtol=loss_rtol, atol=1e-7, err_msg=name
    )
  g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
  r = [np.asarray(x, np.float64) for x in jax.tree.leaves(ref_grads)]
  total = np.sqrt(sum(np.sum(x * x) for x in r))
  diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(g, r)))
  assert diff / total <= tree_rtol, f"gradient tree relative error {diff / total:.2e}"
  worst = []
  for (path, _), a, b in zip(treepath.flatten(ref_grads), g, r):
    norm = np.linalg.norm(b)
    assert np.all(np.isfinite(a)), path
    if norm > 1e-6 * total:
      worst.append((np.linalg.norm(a - b) / norm, path))
  worst.sort(reverse=True)
  assert worst[0][0] <= leaf_rtol, f"largest leaf errors {worst[:3]}"
  return diff / total, worst[0]


def test_reference_is_meaningful(setup):
  """Every loss term of every kind is present, finite and non-zero; gradients reach every tower."""
  (loss, metrics), grads = setup["ref"]
  expected = {f"loss/{t}/{k}" for k in F.KINDS for t in ("itc", "itm", "mlm")}
  expected |= {"loss/box_l1/region", "loss/box_giou/region", "loss/total", "temperature"}
  assert set(metrics) == expected
  for name, value in metrics.items():
    assert np.isfinite(value) and value > 0, (name, value)
  for tower in ("vision", "text", "fusion", "itm_head", "box_head", "mlm_head", "frame_embed"):
    assert (
      np.linalg.norm(np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads[tower])])) > 0
    ), tower


def test_kv_reuse_equals_naive(setup):
  """Production path (each tower once, K/V reused) == the official structure (≤ 1e-6)."""
  got = jax.jit(
    setup["value_and_grad"](STEP_CFG, None, naive_loss_fn), compiler_options=FAST_COMPILE
  )(setup["params"], setup["batch"], setup["key"])
  tree_err, (leaf_err, leaf) = _compare(got, setup["ref"], 1e-6, 1e-6, 1e-5)
  print(f"naive vs reuse: gradient tree {tree_err:.2e}, worst leaf {leaf_err:.2e} ({leaf})")


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_mesh_equals_single_device(setup, axes):
  """Sharded params + sharded batch + activation constraints: same loss and gradients (1e-5)."""
  mesh = sharding.make_mesh(axes)
  param_sh = TrainStateSpec.build(setup["cfg"], optim.OptimConfig(), mesh).param_shardings
  batch_sh = global_batch.shardings(setup["batch"], mesh)
  params = jax.device_put(setup["params"], param_sh)
  batch = jax.device_put(setup["batch"], batch_sh)
  # The parameters really are split: the word embedding over 'tensor', widths over 'fsdp'.
  word = params["text"]["embeddings"]["word"]
  assert word.sharding.spec == sharding.logical_to_spec(("vocab", "embed"), word.shape, mesh)
  replicated = NamedSharding(mesh, P())
  fn = jax.jit(
    setup["value_and_grad"](STEP_CFG, mesh),
    compiler_options=FAST_COMPILE,
    in_shardings=(param_sh, batch_sh, replicated),
    out_shardings=((replicated, replicated), param_sh),
  )
  with jax.set_mesh(mesh):
    got = fn(params, batch, setup["key"])
  tree_err, (leaf_err, leaf) = _compare(got, setup["ref"], 1e-5, 1e-5, 1e-5)
  print(f"{axes}: gradient tree {tree_err:.2e}, worst leaf {leaf_err:.2e} ({leaf})")
