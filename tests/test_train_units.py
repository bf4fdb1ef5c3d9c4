"""Trainer pieces without compiling a step: batch sizes, aux streams, state shardings, helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import tiny
from data_pipelines import features as F
from x2vlm_jax import run_config as rc
from x2vlm_jax import train_data, train_report, train_step
from x2vlm_jax.models.config import ModelConfig


class _Mesh:
  def __init__(self, **shape):
    self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}


def test_global_batch_sizes_split_over_processes():
  c = tiny.get_config()
  c.batch.image, c.batch.region, c.batch.region_max_images = 8, 8, 4
  mc = rc.model_config(c)
  s = rc.batch_sizes(c, mc, _Mesh(data=4), process_count=2)
  assert (s.image_batch, s.region_batch, s.region_max_images, s.video_batch) == (4, 4, 2, 0)
  # Image resolution and patch size come from the model config.
  assert (s.image_res, s.patch_size) == (mc.vision.image_size, mc.vision.patch_size)
  with pytest.raises(ValueError, match="batch.image = 8 .* 3 processes"):
    rc.batch_sizes(c, mc, _Mesh(data=3), process_count=3)
  with pytest.raises(ValueError, match="batch.region_max_images = 4 .* 8 batch shards"):
    rc.batch_sizes(c, mc, _Mesh(data=4, fsdp=2), process_count=1)
  # With accumulation the error names the global value and the per-micro-batch one.
  with pytest.raises(ValueError, match="batch.image = 8 .* gives 4 per micro-batch.* 8 batch"):
    rc.batch_sizes(c, mc, _Mesh(data=8), process_count=1, accum_steps=2)


def test_aux_stream_coin_and_state():
  c = tiny.get_config("aux")
  tok = __import__("data_pipelines.text_ops", fromlist=["Tokenizer"]).Tokenizer(
    rc.tokenizer_dir(c), c.data.max_tokens
  )
  mc = rc.model_config(c)
  sizes = rc.batch_sizes(c, mc, _Mesh(), 1)
  streams = train_data.DataStreams(
    rc.streams_config(c), sizes, rc.preproc_config(c, mc), tok, 42, 0, 1
  )
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
  with pytest.raises(ValueError, match="never be used"):
    rc.streams_config(c)


def test_temperature_clamped_by_the_step():
  cfg = ModelConfig.tiny()
  for raw, want in ((0.9, cfg.temp_max), (1e-5, cfg.temp_min), (0.07, 0.07)):
    got = train_step.clamp_temp({"temp": np.float32(raw), "x": 1}, cfg)
    assert float(got["temp"]) == pytest.approx(want) and got["x"] == 1


def test_truncate_jsonl_and_profile_steps(tmp_path):
  p = tmp_path / "m.jsonl"
  p.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "me')
  train_report.truncate_jsonl(p, 4)
  assert [json.loads(l)["step"] for l in p.read_text().splitlines()] == [1, 2, 3]
  assert rc.parse_profile_steps("10,15") == (10, 15)
  assert rc.parse_profile_steps("") is None
  with pytest.raises(ValueError):
    rc.parse_profile_steps("15,10")
