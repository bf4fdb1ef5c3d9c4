"""Training configs: the released settings (docs/fidelity.md#released-configurations), derived
values, CLI overrides."""

from __future__ import annotations

import importlib
import math

import pytest
from absl import flags
from ml_collections import config_flags

from x2vlm_jax import optim, train_lib
from x2vlm_jax import run_config as rc

RELEASED = {
  # name: (variant, image, region texts, region images, video, region iter_perc, lr, warmup,
  #        total_steps, schedule steps, max_tokens)
  "pretrain_base_4m": ("base", 1024, 1024, 400, 0, 1.0, 1e-4, 2500, 504_495, 504_495, 40),
  "pretrain_large_4m": ("large", 1024, 1024, 400, 0, 1.0, 5e-5, 2500, 250_000, 504_495, 40),
  "pretrain_base_1b": (
    "base",
    3072,
    1536,
    624,
    0,
    0.5,
    1e-4,
    2500,
    3 * math.ceil(1_323_042_683 / 3072),
    None,
    30,
  ),
  "pretrain_large_1b": (
    "large",
    4096,
    2048,
    896,
    0,
    0.5,
    5e-5,
    2500,
    3 * math.ceil(1_323_042_683 / 4096),
    None,
    30,
  ),
  "pretrain_base_1b_stage2": ("base", 1024, 1024, 416, 640, 1.0, 6e-5, 1000, 404_595, None, 40),
  "pretrain_large_1b_stage2": ("large", 1024, 1024, 448, 640, 1.0, 3e-5, 1000, 404_595, None, 40),
}


def _load(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_settings(name):
  (
    variant,
    image,
    region,
    region_images,
    video,
    region_perc,
    lr,
    warmup,
    steps,
    schedule,
    max_tokens,
  ) = RELEASED[name]
  c = _load(name)
  assert c.model.variant == variant
  assert (c.batch.image, c.batch.region, c.batch.region_max_images, c.batch.video) == (
    image,
    region,
    region_images,
    video,
  )
  assert c.loss.iter_perc.region == region_perc
  assert (c.optim.lr, c.optim.warmup_steps, c.train.total_steps) == (lr, warmup, steps)
  assert c.optim.total_steps == (schedule or steps)
  assert c.data.max_tokens == max_tokens and c.train.seed == 42
  assert all(len(c.data[k]) > 0 for k in ("image", "region"))
  # Everything the trainer derives from the config is buildable.
  mc = rc.model_config(c)
  assert mc.frame_len == (3 if video else 0) and mc.vision.image_size == 224
  optim.OptimConfig(**c.optim.to_dict())
  rc.step_config(c)
  rc.loop_config(c)
  rc.streams_config(c)
  rc.init_config(c)
  rc.preproc_config(c, mc)


def test_1b_stage1_aux_and_itm():
  c = _load("pretrain_base_1b")
  assert c.loss.aux_iter_perc.image == 0.15 and c.loss.stop_calc_itm == 200_000
  assert len(c.data.aux.image) == 5 and len(c.data.image) == 2  # clean 4M + CC12M; LAION
  assert len(c.data.region) == 8  # 6 sources of 4M + OpenImages + Objects365
  on = train_lib.itm_for_step(rc.loop_config(c), 10, {"image": True}, image_aux=True)
  off = train_lib.itm_for_step(rc.loop_config(c), 10, {"image": False}, image_aux=True)
  late = train_lib.itm_for_step(rc.loop_config(c), 200_000, {"image": True}, image_aux=True)
  assert (on, off, late) == (True, False, False)
  s2 = _load("pretrain_base_1b_stage2")
  assert s2.loss.aux_iter_perc.video == 0.35 and len(s2.data.aux.video) == 1
  assert train_lib.itm_for_step(rc.loop_config(s2), 10**6, {"video": True}, image_aux=False)


def test_schedule_follows_total_steps_until_set():
  c = _load("tiny")
  c.train.total_steps = 77
  assert c.optim.total_steps == 77
  c.optim.total_steps = 100
  c.train.total_steps = 5
  assert (c.train.total_steps, c.optim.total_steps) == (5, 100)


def test_tiny_options():
  assert _load("tiny").batch.video == 0
  v = _load("tiny", "video")
  assert v.batch.video == 2 and v.model.frame_len == 2
  assert _load("tiny", "aux").loss.aux_iter_perc.image == 0.5
  with pytest.raises(ValueError, match="unknown options"):
    _load("tiny", "vidoe")


def _parse(argv):
  argv = ["prog", "--config=configs/tiny.py", *argv]
  fv = flags.FlagValues()
  # sys_argv: the override flags are defined from the command line at definition time.
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
  )
  fv(argv)
  return fv.config


def test_cli_overrides_and_typos():
  c = _parse(["--config.optim.lr=0.5", "--config.train.total_steps=9"])
  assert c.optim.lr == 0.5 and c.optim.total_steps == 9
  with pytest.raises(Exception, match="lrr"):
    _parse(["--config.optim.lrr=0.5"])
  with pytest.raises(Exception):
    _parse(["--config.train.seed=abc"])


def test_scan_unroll_option():
  from x2vlm_jax import run_config

  assert run_config.model_config(_parse([])).scan_unroll == 1
  assert run_config.model_config(_parse(["--config.model.scan_unroll=2"])).scan_unroll == 2
  with pytest.raises(ValueError, match=r"scan_unroll 0 \(config.model.scan_unroll\)"):
    run_config.model_config(_parse(["--config.model.scan_unroll=0"]))
