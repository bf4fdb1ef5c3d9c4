"""The VQA, NLVR2 and video-QA tasks: the loss falls on synthetic data within a few jitted
steps, their models load official-format state dicts with only the new heads missing (the VQA
decoder initialised from the fusion layers), and their configs build."""

import dataclasses
import importlib

import jax
import numpy as np
import pytest
from convert_testlib import random_official
from train_step_testlib import FAST_COMPILE

from configs.finetune import tiny_qa
from data_pipelines import features as F
from data_pipelines import synthetic_qa
from data_pipelines.examples import make_example
from data_pipelines.packing import Tagged, pack_rows
from data_pipelines.text_ops import Tokenizer
from x2vlm_jax import assets, global_batch, optim, sharding, step_jit, tasks, treepath
from x2vlm_jax import run_config as rc
from x2vlm_jax.convert import adapt
from x2vlm_jax.convert import official as O
from x2vlm_jax.convert import official_spec as S
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.objectives import StepConfig
from x2vlm_jax.train_state import TrainStateSpec

HEADS = {
  "vqa": dict(decoder_layers=2),
  "nlvr2": dict(cls_labels=2, cls_inputs=2),
  "video_qa": dict(cls_labels=16, frame_len=2),
}


LR = {"vqa": 2e-3, "nlvr2": 3e-4, "video_qa": 2e-3}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("qa_data")
  synthetic_qa.write_vqa(d / "vqa", n_train=8, n_val=2, n_test=2)
  synthetic_qa.write_nlvr2(d / "nlvr2", n_train=8, n_dev=2, n_test=2)
  synthetic_qa.write_video_qa(d / "video_qa", n_train=3, n_val=1, n_test=1)
  return d


def _batch(task, data, sizes, preproc):
  """One fixed host batch of the task's synthetic training split, through the production
  reader, example builder and packer."""
  tok = Tokenizer(str(assets.minilm_dir()), preproc.max_tokens)
  kind = F.TASK_KIND[task]
  src = tiny_qa.sources(str(data), task)["train"]
  from data_pipelines.source_specs import build_source

  source = build_source(kind, src)
  items = [
    Tagged(make_example(kind, source[i], np.random.default_rng(i), preproc, tok), None, i, 0)
    for i in range(8)
  ]
  return {kind: pack_rows(kind, items, sizes)}


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "video_qa"])
def test_loss_falls_in_a_few_steps(task, data):
  c = tiny_qa.get_config(f"task={task},data={data}")
  model_cfg = rc.model_config(c)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  sizes, preproc = rc.batch_sizes(c, model_cfg, mesh, 1), rc.preproc_config(c, model_cfg)
  batch = global_batch.put([_batch(task, data, sizes, preproc)], mesh)
  spec = TrainStateSpec.build(
    model_cfg, optim.OptimConfig(lr=LR[task], total_steps=100, warmup_steps=0, clip_norm=None), mesh
  )
  state = spec.init(jax.random.key(0, impl="rbg"), compiler_options=FAST_COMPILE)
  step = step_jit.task_step(
    spec, tasks.get(task), StepConfig(deterministic=True), compiler_options=FAST_COMPILE
  )
  losses = []
  for i in range(6):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics[f"loss/{task}/{F.TASK_KIND[task]}"]))
  assert np.isfinite(losses).all(), losses
  if task == "nlvr2":  # a fresh pair classifier on a random tiny model moves slowly
    assert np.mean(losses[-3:]) < losses[0], losses
  else:
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.parametrize("task", ["vqa", "vqa_same_width", "nlvr2", "video_qa"])
def test_official_pretraining_file_loads_with_only_the_new_heads_missing(task):
  """A pre-training `.th` (every key used) into a task model: exactly the new head's
  parameters are left at init (fresh); the VQA decoder is initialised from the file."""
  base = ModelConfig.tiny()
  if task == "vqa_same_width":  # D_v = D_t as in both released sizes: cross K/V copied too
    base = base.replace(vision=dataclasses.replace(base.vision, width=40, num_heads=4))
  dst = base.replace(**HEADS[task.replace("_same_width", "")])
  sd = random_official(base.replace(frame_len=dst.frame_len), S.PRETRAIN)
  params, report, fresh = adapt.official_params(sd, dst)
  assert not report.missing and len(report.matched) == len(sd)
  heads = [
    p
    for p in treepath.flatten_dict(O.param_shapes(dst))
    if p.split(".")[0] in ("text_decoder", "cls_head")
  ]
  flat = treepath.flatten_dict(params)
  if task.startswith("vqa"):  # the official init: fusion layers, text embeddings, MLM head
    cross_kv = {p for p in heads if ".cross_attn.key." in p or ".cross_attn.value." in p}
    assert set(fresh) == (set() if task == "vqa_same_width" else cross_kv)
    for ours, theirs in (
      ("text_decoder.layers.mlp.fc1.kernel", "fusion.layers.mlp.fc1.kernel"),
      ("text_decoder.layers.cross_attn.query.kernel", "fusion.layers.cross_attn.query.kernel"),
      ("text_decoder.embeddings.word", "text.embeddings.word"),
      ("text_decoder.mlm_head.dense.kernel", "mlm_head.dense.kernel"),
    ):
      np.testing.assert_array_equal(flat[ours], flat[theirs])
  else:
    assert set(fresh) == set(heads) and not any(p in flat for p in heads)


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "video_qa"])
def test_fine_tuned_task_file_round_trip(task):
  cfg = ModelConfig.tiny(**HEADS[task])
  sd = random_official(cfg, S.FINETUNE)
  params, report = O.official_to_params(sd, cfg, allow={"missing"})
  assert not (report.unexpected or report.shape or report.check)
  assert report.missing == [
    "mlm_head.bias",
    "mlm_head.dense.bias",
    "mlm_head.dense.kernel",
    "mlm_head.norm.bias",
    "mlm_head.norm.scale",
  ] or all(m.startswith("mlm_head") for m in report.missing)
  src = adapt.official_source_config(sd, ModelConfig.tiny())
  assert (src.decoder_layers, src.cls_labels, src.cls_inputs) == (
    cfg.decoder_layers,
    cfg.cls_labels,
    cfg.cls_inputs,
  )
  back = O.params_to_official(params, cfg, S.FINETUNE)
  for k in sd:
    np.testing.assert_array_equal(sd[k], back[k], err_msg=k)


def test_half_depth_decoder_takes_the_odd_fusion_layers():
  src = ModelConfig.tiny()
  dst = src.replace(decoder_layers=1)
  fusion = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
  out, _ = adapt.decoder_from_encoder({"fusion.layers.mlp.fc1.bias": fusion}, src, dst)
  np.testing.assert_array_equal(out["text_decoder.layers.mlp.fc1.bias"], fusion[1:])
  with pytest.raises(Exception, match="decoder layers"):
    adapt.decoder_from_encoder({}, src, src.replace(decoder_layers=3))


@pytest.mark.parametrize(
  "name,arg,task",
  [
    ("vqa2", "base", "vqa"),
    ("vqa2", "large", "vqa"),
    ("nlvr2", "base", "nlvr2"),
    ("video_qa", "msrvtt", "video_qa"),
    ("video_qa", "msvd,large", "video_qa"),
  ],
)
def test_configs_build(name, arg, task):
  c = importlib.import_module(f"configs.finetune.{name}").get_config(arg)
  assert c.task == task and rc.task(c).name == task
  assert rc.eval_config(c.eval).names == tasks.TASKS[task].evaluators
  o = rc.optim_config(c)
  m = rc.model_config(c)
  if task == "vqa":
    assert (
      m.decoder_layers == 6 and m.vision.image_size == 768 and o.mult_paths == ("text_decoder",)
    )
    assert optim.param_group("text_decoder.layers.mlp.fc1.kernel", (), o).lr_factor == 2.0
    assert rc.eval_config(c.eval).vqa.k_test == 128
  else:
    assert m.cls_labels in (2, 1500, 1000)
  assert optim.param_group("cls_head.norm.scale", (), o).weight_decay == 0.01
  assert optim.param_group("text_decoder.layers.self_norm.scale", (), o).weight_decay == 0.0
  dataclasses.replace(o)
