"""The task table (`tasks.py`): which objectives each task's loss computes, image-id positives in
retrieval, the batch-kind checks, and configs naming their task."""

import dataclasses

import jax
import numpy as np
import pytest
from train_step_testlib import FAST_COMPILE, init_params

from data_pipelines import features as F
from data_pipelines.testing.random_batch import random_batch
from x2vlm_jax import global_batch, losses, objectives, optim, sharding, tasks
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.train_state import ParamLayout

SIZES = F.BatchSizes(
  image_res=64, max_tokens=12, max_masks=4, image_batch=6, region_batch=4, region_max_images=4
)
IDS = np.array([7, 3, 7, 1, 3, 7], np.int32)  # images 0, 2, 5 are the same picture, 1 and 4 too


@pytest.fixture(scope="module")
def setup():
  cfg = ModelConfig.tiny()
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=2000))
  layout = ParamLayout.build(cfg, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  params = init_params(cfg, 5)
  batch = global_batch.device_fields(random_batch(SIZES, vocab=2000, seed=2))
  batch[F.IMAGE][F.IMAGE_ID] = IDS
  return layout, params, batch


def _terms(setup, task_name, kinds):
  layout, params, batch = setup
  task = tasks.get(task_name)
  cfg = dataclasses.replace(
    objectives.StepConfig(deterministic=True, neg_shards=1),
    objectives=task.objectives,
    image_ids=task.image_ids,
  )

  def fn(p, b):
    return objectives.merged_terms(layout.model(p), b, jax.random.key(0), cfg)

  sub = {k: batch[k] for k in kinds}
  return jax.device_get(jax.jit(fn, compiler_options=FAST_COMPILE)(params, sub))


def test_each_task_computes_only_its_objectives(setup):
  assert set(_terms(setup, "retrieval", [F.IMAGE])[F.IMAGE]) == {"itc", "itm"}
  assert set(_terms(setup, "grounding", [F.REGION])[F.REGION]) == {"box_l1", "box_giou"}


def test_retrieval_itc_uses_image_id_soft_targets(setup):
  layout, params, batch = setup
  got = _terms(setup, "retrieval", [F.IMAGE])[F.IMAGE]["itc"]
  model = layout.model(params)
  b = batch[F.IMAGE]
  v, t = model.itc_features(
    model.encode_image(b[F.PIXELS]), model.encode_text(b[F.TEXT_IDS], b[F.TEXT_MASK])
  )
  temp = float(np.clip(params["temp"], 0.001, 0.5))
  want = losses.itc_loss(v, t, temp, b[F.VALID], ids=IDS)
  plain = losses.itc_loss(v, t, temp, b[F.VALID])
  np.testing.assert_allclose(got, want, rtol=2e-5)
  assert abs(float(want) - float(plain)) > 1e-4  # the ids change the loss (random init: a little)


def test_retrieval_negatives_never_share_the_image_id(setup):
  _, _, batch = setup
  rng = np.random.default_rng(0)
  v, t = rng.standard_normal((6, 8)), rng.standard_normal((6, 8))
  cfg = objectives.StepConfig(neg_shards=1, image_ids=True)
  for s in range(50):
    neg_img, neg_txt = objectives.negatives(
      jax.random.key(s), v, t, 0.1, np.ones(6), cfg, None, ids=IDS
    )
    for i in range(6):
      assert IDS[int(neg_img[i])] != IDS[i] and IDS[int(neg_txt[i])] != IDS[i], (s, i)


def test_batch_kinds_checked():
  with pytest.raises(ValueError, match="set config.batch.region = 0"):
    tasks.get("retrieval").check_batch({"image": 8, "region": 4, "video": 0})
  with pytest.raises(ValueError, match="needs a batch of video"):
    tasks.get("video_retrieval").check_batch({"image": 0, "region": 0, "video": 0})
  with pytest.raises(ValueError, match="known tasks"):
    tasks.get("retreival")


@pytest.mark.parametrize(
  "name,task",
  [
    ("retrieval_coco", "retrieval"),
    ("retrieval_flickr", "retrieval"),
    ("video_retrieval_msrvtt", "video_retrieval"),
    ("grounding_refcoco", "grounding"),
  ],
)
def test_finetune_configs_build(name, task):
  import importlib

  from x2vlm_jax import run_config as rc

  c = importlib.import_module(f"configs.finetune.{name}").get_config()
  assert c.task == task and rc.task(c).name == task
  step = rc.step_config(c)
  assert step.objectives == tasks.TASKS[task].objectives
  assert rc.eval_config(c.eval).names == tasks.TASKS[task].evaluators
  assert c.optim.clip_norm == 0.0 and c.optim.warmup_steps == 0.1
  assert c.train.select_metric.startswith("eval/")
  rc.loop_config(c)
  optim.OptimConfig(**c.optim.to_dict())
