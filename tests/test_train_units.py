"""Trainer pieces without compiling a step: batch sizes, aux streams, state shardings, helpers."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from configs import tiny
from data_pipelines import features as F
from x2vlm_jax import metrics_writer, train_data, train_report, train_step
from x2vlm_jax import run_config as rc
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


def _events(workdir) -> list:
  """(step, kind) of every TensorBoard event in file order ('purge' for a SessionLog START)."""
  from tensorboardX.proto import event_pb2

  out = []
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    raw = path.read_bytes()
    while raw:
      n = int.from_bytes(raw[:8], "little")
      ev = event_pb2.Event.FromString(raw[12 : 12 + n])
      raw = raw[16 + n :]
      kind = "purge" if ev.session_log.status == 1 else ev.WhichOneof("what")
      out.append((ev.step, kind))
  return out


def test_restart_logs_trim_to_the_start_step(tmp_path):
  """On every start the logs agree with the state: metrics.jsonl keeps the steps <= the restored
  step (none on a fresh start), the example ids the steps before it, and TensorBoard gets a
  purge event hiding later ones."""
  ids = tmp_path / "example_ids.p0.jsonl"
  ids.write_text("".join(json.dumps({"step": s, "ids": [s]}) + "\n" for s in range(6)))
  with metrics_writer.MetricsWriter(tmp_path) as w:
    for s in range(1, 7):
      w.write_scalars(s, {"train/loss": s})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "metr')  # cut by a kill -9
  steps = lambda p: [json.loads(l)["step"] for l in p.read_text().splitlines()]
  writer = train_report.restart_logs(tmp_path, 3, True, ids)
  assert steps(tmp_path / "metrics.jsonl") == [1, 2, 3] and steps(ids) == [0, 1, 2]
  writer.write_scalars(4, {"train/loss": 4.0})
  writer.close()
  assert steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]
  events = [e for e in _events(tmp_path) if e[1] in ("summary", "purge")]
  assert events[-2:] == [(4, "purge"), (4, "summary")] and (6, "summary") in events[:-2]
  train_report.restart_logs(tmp_path, 0, False, ids).close()  # a fresh start: nothing kept
  assert steps(tmp_path / "metrics.jsonl") == [] and steps(ids) == []


def test_progress_line_skips_and_nonfinite_stop_names_intact_step(tmp_path, caplog):
  loop = dataclasses.replace(
    rc.loop_config(tiny.get_config()), log_every=1, max_consecutive_nonfinite=2
  )
  skips = {"main/image/bad_image": 0}
  writer = metrics_writer.MetricsWriter(tmp_path, tensorboard=False)
  reporter = train_report.Reporter(
    writer,
    loop,
    {"image": 4},
    0,
    flops_per_device=lambda: 0.0,
    lr=lambda s: 1e-3,
    skip_counts=lambda: dict(skips),
    latest_checkpoint=lambda: 8,
  )
  m = lambda bad: {"loss/total": np.float32(1.0), "nonfinite_run": bad, "nonfinite_total": bad}
  with caplog.at_level(logging.INFO):
    reporter.step_done(1, m(0))
    reporter.flush()
    skips.update({"main/image/bad_image": 3, "main/region/too_few_boxes": 1, "aux/image/x": 0})
    reporter.step_done(2, m(0))
    reporter.flush()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  assert "skipped" not in lines[0]
  assert lines[1].endswith(" | skipped main/image/bad_image 3 main/region/too_few_boxes 1")
  reporter.step_done(3, m(2))
  with pytest.raises(
    train_report.NonFiniteError, match="newest intact checkpoint is step 8: a relaunch resumes"
  ):
    reporter.flush()
  writer.close()
