"""Fine-tuning initialisation from whole models (`init_lib`): our params directory, a training
workdir (parameters only, architecture from its saved run config) and an official file, each
into a model at a new resolution and frame count; the one-source rule."""

import jax
import numpy as np
import pytest
from convert_testlib import random_official
from flax import nnx
from train_step_testlib import FAST_COMPILE

from configs import tiny
from x2vlm_jax import checkpoint as ckpt_lib
from x2vlm_jax import init_lib, optim, params_io, sharding, treepath
from x2vlm_jax import run_config as rc
from x2vlm_jax.convert import adapt
from x2vlm_jax.convert import official_spec as S
from x2vlm_jax.convert.safetensors_io import save_safetensors
from x2vlm_jax.models.vision import resize_rel_pos_bias
from x2vlm_jax.models.x2vlm import create_sharded
from x2vlm_jax.train_state import TrainStateSpec

STEP = 7


def _key():
  return jax.random.key(5, impl="unsafe_rbg")


def _run_configs(workdir=""):
  """(source run config: tiny video, 64 px, 2 frames; destination: 96 px, 3 frames)."""
  src, dst = tiny.get_config("video"), tiny.get_config("video")
  dst.model.image_res, dst.model.frame_len, dst.init.checkpoint = 96, 3, str(workdir)
  return src, dst


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def source(mesh, tmp_path_factory):
  """A training workdir with one checkpoint of the source run; (workdir, run config, params)."""
  src_run, _ = _run_configs()
  spec = TrainStateSpec.build(rc.model_config(src_run), optim.OptimConfig(), mesh)
  state = spec.init(jax.random.key(1, impl="rbg"), compiler_options=FAST_COMPILE)
  workdir = tmp_path_factory.mktemp("pretrain_run")
  with ckpt_lib.CheckpointManager(workdir / ckpt_lib.CKPT_DIR, async_save=False) as m:
    item = spec.checkpoint_item(state, jax.random.key_data(jax.random.key(0)))
    m.save(STEP, item, config=ckpt_lib.to_jsonable(src_run), force=True)
  return workdir, src_run, {p: np.asarray(v) for p, v in treepath.flatten(state["params"])}


@pytest.fixture(scope="module")
def fresh(mesh):
  """The destination model as `initialize` first builds it (same key): the fresh values."""
  _, dst_run = _run_configs()
  model = create_sharded(rc.model_config(dst_run), mesh, _key())
  return _values(model)


def _values(model):
  return {p: v[...] for p, v in treepath.flatten_state(nnx.state(model, nnx.Param)).items()}


def _check_adapted(result, src: dict, fresh: dict):
  """Every source parameter landed (tables resized 4 -> 6, frame rows 0-1 copied, row 2 at
  init) in the model's shardings; only the frame embedding is fresh."""
  assert result.fresh_paths == ("frame_embed",)
  got = _values(result.model)
  assert got.keys() == fresh.keys() == src.keys()
  for p, v in src.items():
    assert got[p].sharding == fresh[p].sharding, p
    g = np.asarray(got[p])
    if p == adapt.REL_POS:
      assert g.shape == (2, 11 * 11 + 3, 3)
      for i in range(2):
        np.testing.assert_array_equal(g[i], resize_rel_pos_bias(v[i], 4, 6))
    elif p == "frame_embed":
      np.testing.assert_array_equal(g[:2], v)
      np.testing.assert_array_equal(g[2], np.asarray(fresh[p])[2])
    else:
      np.testing.assert_array_equal(g, v, err_msg=p)


def test_checkpoint_workdir_at_new_resolution_and_frames(mesh, source, fresh):
  workdir, src_run, src = source
  _, dst_run = _run_configs(workdir)
  # A save of the source run in progress is left alone (read-only).
  in_progress = workdir / ckpt_lib.CKPT_DIR / f"{STEP + 1}.orbax-checkpoint-tmp-1"
  in_progress.mkdir()
  init = rc.init_config(dst_run)  # the source architecture from the checkpoint's saved config
  assert init.checkpoint == str(workdir)
  assert init.checkpoint_model == rc.model_config(src_run)
  assert init.checkpoint_model.vision.image_size == 64 and init.checkpoint_model.frame_len == 2
  result = init_lib.initialize(init, rc.model_config(dst_run), mesh, _key())
  _check_adapted(result, src, fresh)
  assert any(f"step {STEP}: parameters only" in n for n in result.notes)
  assert any("frame_embed: 2 -> 3 frames" in n for n in result.notes)
  assert in_progress.is_dir()
  in_progress.rmdir()
  # The checkpoints directory itself works too.
  assert init_lib.checkpoint_dir(workdir / ckpt_lib.CKPT_DIR) == workdir / ckpt_lib.CKPT_DIR
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    init_lib.checkpoint_dir(workdir.parent)


def test_params_dir_at_new_resolution_and_frames(mesh, source, fresh, tmp_path):
  _, src_run, src = source
  _, dst_run = _run_configs()
  params_io.save_params(tmp_path / "p", rc.model_config(src_run), treepath.unflatten_dict(src))
  init = init_lib.InitConfig(params_dir=str(tmp_path / "p"))
  result = init_lib.initialize(init, rc.model_config(dst_run), mesh, _key())
  _check_adapted(result, src, fresh)


def test_official_file_at_new_resolution_and_frames(mesh, fresh, tmp_path):
  src_run, dst_run = _run_configs()
  src_cfg = rc.model_config(src_run)
  sd = random_official(src_cfg, layout=S.FINETUNE)
  sd = {k.replace("text_encoder.", "text_encoder.roberta.", 1): v for k, v in sd.items()}
  save_safetensors(tmp_path / "ft.safetensors", sd, {})
  init = init_lib.InitConfig(official_th=str(tmp_path / "ft.safetensors"))
  result = init_lib.initialize(init, rc.model_config(dst_run), mesh, _key())
  mlm = [p for p in fresh if p.startswith("mlm_head.")]
  assert result.fresh_paths == tuple(sorted(mlm + ["frame_embed"]))
  got = _values(result.model)
  for p in mlm:  # not in the file: left at their initial values
    np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(fresh[p]))
  frames = np.asarray(got["frame_embed"])
  np.testing.assert_array_equal(frames[:2], sd["absolute_frame_pos_embed"].reshape(2, -1))
  np.testing.assert_array_equal(frames[2], np.asarray(fresh["frame_embed"])[2])
  table = sd["vision_encoder.blocks.0.attn.relative_position_bias_table"]
  np.testing.assert_array_equal(np.asarray(got[adapt.REL_POS])[0], resize_rel_pos_bias(table, 4, 6))
  assert any("unexpected 0" in n for n in result.notes)


def test_one_source_and_checkpoint_needs_its_architecture(mesh, tmp_path):
  both = init_lib.InitConfig(params_dir="a", checkpoint="b")
  with pytest.raises(ValueError, match=r"choose one weight source.*checkpoint"):
    init_lib.initialize(both, rc.model_config(tiny.get_config()), mesh, _key())
  with pytest.raises(ValueError, match="needs checkpoint_model"):
    init_lib.initialize(
      init_lib.InitConfig(checkpoint=str(tmp_path)), rc.model_config(tiny.get_config()), mesh, 0
    )
  with pytest.raises(ValueError, match="no `model` section"):
    rc.saved_model_config({"train": {}})
