"""Tests of x2vlm_jax.metrics_writer: JSONL lines, TensorBoard events, progress lines."""

import glob
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from x2vlm_jax import metrics_writer as mw


def _read_tb_scalars(logdir):
  """Reads scalar summaries back from tensorboardX event files (TFRecord framing + Event protos)."""
  from tensorboardX.proto import event_pb2

  files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  assert files, f"no event file in {logdir}"
  out = []
  for path in files:
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      record = data[pos + 12 : pos + 12 + length]  # skip the length's crc; then data, data crc
      pos += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.append((event.step, value.tag, value.simple_value))
  return out


def test_jsonl_and_tensorboard(tmp_path):
  with mw.MetricsWriter(tmp_path) as writer:
    writer.write_scalars(
      1, {"train/loss": jnp.float32(2.5), "train/loss/itc": np.float64(1.25), "lr": 1e-4}
    )
    writer.write_scalars(2, {"train/loss": float("nan"), "train/l2_grads": float("inf")})
    writer.write_text(0, "config", "model: tiny")
  lines = [json.loads(l) for l in open(tmp_path / mw.JSONL_NAME)]
  assert [l["step"] for l in lines] == [1, 2]
  assert lines[0]["metrics"] == {"train/loss": 2.5, "train/loss/itc": 1.25, "lr": 1e-4}
  assert lines[1]["metrics"] == {"train/loss": "NaN", "train/l2_grads": "Infinity"}
  assert all(isinstance(l["wall_time"], float) for l in lines)
  scalars = _read_tb_scalars(str(tmp_path))
  assert (1, "train/loss", 2.5) in scalars and (1, "train/loss/itc", 1.25) in scalars
  assert any(step == 2 and tag == "train/loss" and np.isnan(v) for step, tag, v in scalars)
  # Appends on restart instead of truncating.
  with mw.MetricsWriter(tmp_path, tensorboard=False) as writer:
    writer.write_scalars(3, {"train/loss": 1.0})
  assert len(open(tmp_path / mw.JSONL_NAME).readlines()) == 3


def test_non_zero_process_writes_nothing(tmp_path):
  writer = mw.MetricsWriter(tmp_path / "run", process_index=1)
  writer.write_scalars(1, {"loss": 1.0})
  writer.log("ignored")
  writer.close()
  assert not os.path.exists(tmp_path / "run")


def test_bad_metric_named(tmp_path):
  with mw.MetricsWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(TypeError, match="metric 'train/acc' must be a scalar"):
      writer.write_scalars(1, {"train/acc": np.zeros(3)})


def test_progress_line_format():
  line = mw.format_progress(
    120,
    1000,
    {"train/loss": 3.21, "train/loss/itc": 1.02, "train/loss/itm": 0.55, "train/lr": 1e-4},
    examples_per_sec={"image": 512.0, "region": 128.04},
    eta_seconds=880.4,
    mfu=0.4123,
  )
  assert line == (
    "step 120/1000 (12.0%) | loss 3.2100 itc 1.0200 itm 0.5500 | "
    "ex/s image 512.0 region 128.0 | ETA 0:14:40 | MFU 41.2%"
  )
  assert mw.format_progress(5, 10) == "step 5/10 (50.0%)"
  assert "ETA 2d 1:00:00" in mw.format_progress(1, 2, eta_seconds=2 * 86400 + 3600)


def test_progress_rates_and_eta():
  now = [100.0]
  prog = mw.Progress(
    total_steps=110,
    examples_per_step={"image": 64, "video": 8},
    start_step=10,
    clock=lambda: now[0],
  )
  now[0] += 20.0  # 10 steps in 20 s
  line = prog.update(20, {"loss": 2.0}, mfu=0.5)
  # 64 * 10 / 20 = 32 img/s; 8 * 10 / 20 = 4 videos/s; 90 steps left at 2 s/step = 180 s
  assert (
    line
    == "step 20/110 (18.2%) | loss 2.0000 | ex/s image 32.0 video 4.0 | ETA 0:03:00 | MFU 50.0%"
  )
  now[0] += 5.0  # 10 more steps in 5 s: window rate changes, ETA uses the whole-run average
  line = prog.update(30)
  assert "ex/s image 128.0 video 16.0" in line and "ETA 0:01:40" in line  # 80 * 25 / 20
  assert prog.steps_per_sec() == pytest.approx(20 / 25)
