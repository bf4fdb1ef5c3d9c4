"""What the trainer checks when it resumes (`train_lib._Run.start`), in-process on a checkpoint of
the tiny run: a changed text tower is refused with a config diff before any array is read, a
changed data stream setting is a warning, and a workdir whose steps were all moved aside is not
silently started over. No step is compiled."""

import logging

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny
from x2vlm_jax import checkpoint as ckpt_lib
from x2vlm_jax import metrics_writer, sharding, train_lib
from x2vlm_jax import run_config as rc
from x2vlm_jax.train_state import TrainStateSpec

STEP = 5


def _config():
  c = tiny.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  c.batch.region_max_images = 4  # divisible by the 4 batch shards
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir holding step STEP of the tiny run (zeros: the values do not matter here)."""
  cfg = _config()
  model_cfg = rc.model_config(cfg)
  mesh = sharding.make_mesh(cfg.mesh.to_dict())
  spec = TrainStateSpec.build(model_cfg, rc.optim_config(cfg), mesh)
  zeros = lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding)
  state = jax.tree.map(zeros, spec.checkpoint_target())
  key = np.asarray(jax.random.key_data(jax.random.key(cfg.train.seed)))
  state["rng"] = jax.device_put(key, NamedSharding(mesh, P()))
  config = dict(rc.run_json(cfg, model_cfg), _fresh_paths=[])
  workdir = tmp_path_factory.mktemp("run")
  with ckpt_lib.CheckpointManager(workdir / ckpt_lib.CKPT_DIR, async_save=False) as m:
    m.save(STEP, state, data_iter={"process_0": {}}, config=config, force=True)
  return workdir


def _start(cfg, workdir, allow=False):
  writer = metrics_writer.MetricsWriter(workdir, tensorboard=False)
  with ckpt_lib.CheckpointManager(workdir / ckpt_lib.CKPT_DIR) as manager:
    try:
      return train_lib._Run.start(cfg, workdir, manager, writer, rc.loop_config(cfg), allow)
    finally:
      writer.close()


def test_text_tower_change_refused_before_any_array_is_read(workdir, monkeypatch):
  def never(*a, **k):
    raise AssertionError("an array was read")

  monkeypatch.setattr(ckpt_lib.CheckpointManager, "_read_arrays", never)
  cfg = _config()
  cfg.model.text_config_from = "minilm"  # the text tower of another source: 40 -> 384 wide
  with pytest.raises(ckpt_lib.ConfigChangedError) as err:
    _start(cfg, workdir)
  msg = str(err.value)
  assert 'model.text_config_from: "" -> "minilm"' in msg
  assert "_model_resolved.text.width: 40 -> 384" in msg
  # Allowed config changes still cannot restore other shapes: refused naming the leaves.
  with pytest.raises(ckpt_lib.ConfigChangedError, match=r"do not fit.*\n  leaf 'train/params/"):
    _start(cfg, workdir, allow=True)
  assert (workdir / ckpt_lib.CKPT_DIR / str(STEP)).is_dir()  # not treated as corruption


def test_data_stream_change_warns(workdir, caplog):
  cfg = _config()
  cfg.data.max_tokens, cfg.data.mask_prob = 20, 0.3
  cfg.data.num_workers = 2  # no effect on the examples: no warning
  with caplog.at_level(logging.INFO):
    run = _start(cfg, workdir)
  assert run.resumed and run.start_step == STEP
  log = caplog.text
  assert "warning on resume: data stream setting changed: data.max_tokens: 16 -> 20" in log
  assert "data.mask_prob: 0.5 -> 0.3" in log and "num_workers" not in log


def test_no_fresh_start_over_rejected_steps(tmp_path):
  (tmp_path / ckpt_lib.CKPT_DIR / "3.corrupt-20250101T000000Z").mkdir(parents=True)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"no good checkpoint.*3\.corrupt-"):
    _start(_config(), tmp_path)
