"""Trainer pieces without compiling a step: batch sizes, aux streams, state shardings, helpers."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from configs import tiny
from data_pipelines import features as F
from x2vlm_jax import init_lib, sharding, train_data, train_lib


class _Mesh:
  def __init__(self, **shape):
    self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}


def test_global_batch_sizes_split_over_processes():
  c = tiny.get_config()
  c.batch.image, c.batch.region, c.batch.region_max_images = 8, 8, 4
  s = train_data.local_batch_sizes(c, _Mesh(data=4), process_count=2)
  assert (s.image_batch, s.region_batch, s.region_max_images, s.video_batch) == (4, 4, 2, 0)
  with pytest.raises(ValueError, match="batch.image = 8 .* 3 processes"):
    train_data.local_batch_sizes(c, _Mesh(data=3), process_count=3)
  with pytest.raises(ValueError, match="batch.region_max_images = 4 .* 8 batch shards"):
    train_data.local_batch_sizes(c, _Mesh(data=4, fsdp=2), process_count=1)


def test_aux_stream_coin_and_state():
  c = tiny.get_config("aux")
  tok = __import__("data_pipelines.text_ops", fromlist=["Tokenizer"]).Tokenizer(
      train_data.tokenizer_dir(c), c.data.max_tokens)
  sizes = train_data.local_batch_sizes(c, _Mesh(), 1)
  streams = train_data.DataStreams(c, sizes, train_data.preproc_config(c), tok, 42, 0, 1)
  try:
    # The coin is a pure function of (seed, step, kind): same answer every time, ~p of steps.
    coins = [streams.aux_choice(s)["image"] for s in range(2000)]
    assert coins == [streams.aux_choice(s)["image"] for s in range(2000)]
    assert 0.45 < np.mean(coins) < 0.55
    steps = range(6)
    for s in steps:
      batch, choice = streams.next(s)
      assert set(batch) == {F.IMAGE, F.REGION}
      assert choice == {"image": coins[s]}
    state = streams.get_state()
    n_aux = sum(coins[s] for s in steps)
    assert state["aux/image"]["image"]["batch_index"] == n_aux
    assert state["main/image"]["image"]["batch_index"] == len(steps) - n_aux
    assert state["main/region"]["region"]["batch_index"] == len(steps)
    json.dumps(train_data.gather_process_states(state))
    with pytest.raises(ValueError, match="streams"):
      streams.set_state({k: v for k, v in state.items() if k != "aux/image"})
  finally:
    streams.close()


def test_aux_sources_without_probability_rejected():
  c = tiny.get_config("aux")
  c.loss.aux_iter_perc.image = 0.0
  sizes = train_data.local_batch_sizes(c, _Mesh(), 1)
  with pytest.raises(ValueError, match="never be used"):
    train_data.DataStreams(c, sizes, train_data.preproc_config(c), None, 0, 0, 1)


def test_optimizer_state_sharded_like_params():
  c = tiny.get_config()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  m = train_lib._build(c, init_lib.model_config(c), mesh, ())
  params = m.state_shardings["params"]
  mu = m.state_shardings["opt_state"][1].mu  # (clip, HF Adam, lr/decay) states
  flat_p = jax.tree_util.tree_leaves_with_path(params)
  flat_mu = dict(jax.tree_util.tree_leaves_with_path(mu))
  assert len(flat_p) == len(flat_mu)
  sharded = [k for k, s in flat_p if s.spec != jax.sharding.PartitionSpec()
             and any(a is not None for a in s.spec)]
  assert sharded, "the tiny model on this mesh should have some sharded parameters"
  for k, s in flat_p:
    assert flat_mu[k].spec == s.spec, k


def test_truncate_jsonl_and_profile_steps(tmp_path):
  p = tmp_path / "m.jsonl"
  p.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "me')
  train_lib._truncate_jsonl(p, 4)
  assert [json.loads(l)["step"] for l in p.read_text().splitlines()] == [1, 2, 3]
  assert train_lib.parse_profile_steps("10,15") == (10, 15)
  assert train_lib.parse_profile_steps("") is None
  with pytest.raises(ValueError):
    train_lib.parse_profile_steps("15,10")
