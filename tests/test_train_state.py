"""The train state's owner (`train_state.py`): shardings from the optimizer's structure, a state
born sharded, its checkpoint round trip, and the parameters-only restore used by evaluation."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from train_step_testlib import FAST_COMPILE

from x2vlm_jax import checkpoint as ckpt_lib
from x2vlm_jax import optim, sharding
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.train_state import TrainStateSpec, restore_params


@pytest.fixture(scope="module")
def spec():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  return TrainStateSpec.build(ModelConfig.tiny(), optim.OptimConfig(), mesh, ("itm_head",))


@pytest.fixture(scope="module")
def state(spec):
  return spec.init(jax.random.key(0, impl="rbg"), compiler_options=FAST_COMPILE)


def test_optimizer_state_sharded_like_params(spec):
  params = spec.shardings["params"]
  mu = spec.shardings["opt_state"][1].mu  # (clip, HF Adam, lr/decay) states
  flat_p = jax.tree_util.tree_leaves_with_path(params)
  flat_mu = dict(jax.tree_util.tree_leaves_with_path(mu))
  assert len(flat_p) == len(flat_mu)
  sharded = [k for k, s in flat_p if any(a is not None for a in s.spec)]
  assert sharded, "the tiny model on this mesh should have some sharded parameters"
  for k, s in flat_p:
    assert flat_mu[k].spec == s.spec, k
  # Counters (Adam's step count, the schedule's, the state's) are replicated.
  assert spec.shardings["opt_state"][1].count.spec == P()
  assert spec.shardings["step"].spec == P()


def test_state_is_born_sharded(spec, state):
  got = jax.tree.map(lambda x: x.sharding.spec, state)
  want = jax.tree.map(lambda s: s.spec, spec.shardings)
  assert got == want
  abstract = spec.abstract_state()
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
    lambda x: (x.shape, x.dtype), state
  )


def test_model_from_params_round_trip(spec, state):
  from flax import nnx

  model = spec.model(state["params"])
  back = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, back, state["params"])


def test_checkpoint_round_trip_and_params_only_restore(spec, state, tmp_path):
  rng = jax.random.key_data(jax.random.key(42))
  with ckpt_lib.CheckpointManager(tmp_path, async_save=False) as m:
    m.save(3, spec.checkpoint_item(state, rng), config={}, force=True)
  with ckpt_lib.CheckpointManager(tmp_path) as m:
    full = m.restore(spec.checkpoint_target())
    params, step = restore_params(m, spec.params)
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, full.state["train"], state)
  jax.tree.map(np.testing.assert_array_equal, params, state["params"])
  # The parameters land in their shardings; nothing else was read.
  assert jax.tree.map(lambda x: x.sharding.spec, params) == jax.tree.map(
    lambda s: s.spec, spec.param_shardings
  )
