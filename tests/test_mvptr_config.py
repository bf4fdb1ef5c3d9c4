"""The MVPTR side of the run config (model.family = 'mvptr', tasks mvptr_stage1/2, `loss.mvptr`,
`data.mvptr`, `init`): typed settings, the optimizer groups of the MVPTR parameters, and errors
that name the config field. Nothing here compiles; the runs are tests/test_mvptr_train.py."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from configs.mvptr import stage1, stage2, tiny_stage1, tiny_stage2
from x2vlm_jax import init_lib, optim, sharding, tasks, treepath
from x2vlm_jax import run_config as rc
from x2vlm_jax.models import family
from x2vlm_jax.models.mvptr_config import MvptrConfig
from x2vlm_jax.objectives import StepConfig
from x2vlm_jax.tasks_mvptr_pretrain import objectives_for


def test_stage_configs_are_the_papers():
  c1 = stage1.get_config("spec=d/oscar.yaml,pairs=102400")
  c2 = stage2.get_config("spec=d/oscar.yaml,pairs=102400,stage1=runs/s1")
  for c in (c1, c2):
    assert (c.batch.image, c.optim.lr, c.optim.warmup_steps, c.optim.min_lr) == (1024, 1e-4, 0.2, 0)
    m = rc.model_config(c)
    assert isinstance(m, MvptrConfig) and m == MvptrConfig.base(phrase_head=True, dtype=m.dtype)
    s = rc.mvptr_rc.streams_config(c, m, rc.batch_sizes(c, m, _mesh(), 1)).spec
    assert (s.max_tokens, s.max_phrases, s.max_tags, s.max_regions) == (35, 5, 20, 50)
    assert (s.tag_rate, s.vocab_size, s.region_dim) == (0.25, 86051, 2054)
  assert (c1.train.total_steps, c2.train.total_steps) == (1500, 3000)  # 15 / 30 epochs
  assert c1.init.bert_dir and c2.init.checkpoint == "runs/s1"
  one = objectives_for(1, c1.loss.mvptr)
  assert [n for n, w in one.weights if w] == ["mcr_v", "mcr_s", "vsc"]
  assert all(w == 1 for _, w in objectives_for(2, c2.loss.mvptr).weights)
  assert rc.task(c1).name == "mvptr_stage1" and rc.step_config(c2).mvptr["itm"] == "paper"
  # The tiny table ends exactly at the synthetic world's last phrase id.
  from data_pipelines import mvptr_synthetic
  from data_pipelines.mvptr_oscar import load_tokenizer

  ids = mvptr_synthetic.phrase_vocab(load_tokenizer(None)).ids
  assert max(ids) + 1 == rc.model_config(tiny_stage1.get_config("spec=s")).vocab_size
  t1 = tiny_stage2.get_config("spec=s,stage1=w")
  assert rc.model_config(t1) == rc.model_config(tiny_stage1.get_config("spec=s"))
  with pytest.raises(ValueError, match="stage1=..."):
    tiny_stage2.get_config("spec=s")


def _mesh():
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def test_every_mvptr_parameter_has_its_optimizer_group():
  state = nnx.state(family.abstract(MvptrConfig.tiny(phrase_head=True)), nnx.Param)
  groups = {
    p: optim.param_group(p, (), optim.OptimConfig()).name for p in treepath.flatten_state(state)
  }
  no_decay = sorted(p for p, g in groups.items() if g == "base/no_decay")
  # The official no-decay list: every bias and every LayerNorm weight, nothing else.
  assert all(p.endswith(("bias", "norm.scale")) for p in no_decay), no_decay
  assert all(g == "base/decay" for p, g in groups.items() if p not in no_decay)
  assert {"txt_encoder.layers.attn_norm.scale", "embeddings.norm.scale"} <= set(no_decay)
  assert groups["logit_scale"] == "base/decay"  # no substring of the official list


def _bad(c, match):
  with pytest.raises(ValueError, match=match):
    rc.model_config(c)
    rc.task(c)
    rc.mvptr_rc.streams_config(
      c, rc.model_config(c), rc.batch_sizes(c, rc.model_config(c), _mesh(), 1)
    )


def test_config_errors_name_the_field():
  base = lambda: tiny_stage1.get_config("spec=s")  # noqa: E731
  c = base()
  c.model.family = "clip"
  _bad(c, r"config\.model\.family = 'clip'")
  c = base()
  c.model.mvptr.depht = 2
  _bad(c, r"config\.model\.mvptr: unknown fields \['depht'\]")
  c = base()
  c.model.mvptr.phrase_layer = 5
  _bad(c, r"config\.model\.mvptr: phrase_layer 5")
  c = base()
  c.model.variant = "large"
  _bad(c, r"config\.model\.variant = 'large'")
  c = base()
  c.model.family = "x2vlm"
  c.model.variant = "tiny"
  with pytest.raises(ValueError, match=r"config\.task = 'mvptr_stage1' trains a mvptr model"):
    rc.task(c)
  c = base()
  c.data.mvptr.max_phrase = 3
  _bad(c, r"config\.data\.mvptr: unknown keys \['max_phrase'\]")
  c = base()
  c.data.mvptr.spec = ""
  _bad(c, r"config\.data\.mvptr\.spec")
  c = base()
  c.data.mvptr.max_tokens = 60
  _bad(c, r"max_positions 48 \(config\.model\.mvptr\.max_positions\)")
  for stage, section, match in (
    (1, {"weights": {"wpg": 1.0}}, r"config\.loss\.mvptr\.weights\.wpg = 1\.0: stage 1"),
    (2, {"weights": {"itc": 1.0}}, r"config\.loss\.mvptr\.weights\.itc: not an MVPTR objective"),
    (2, {"weights": {n: 0 for n in ("mcr_v", "mcr_s", "vsc", "wpg", "itm", "mlm")}}, "weight 0"),
    (2, {"wpg": "official"}, r"config\.loss\.mvptr\.wpg = 'official'"),
    (2, {"itm_mode": "code"}, r"config\.loss\.mvptr: unknown keys \['itm_mode'\]"),
  ):
    with pytest.raises(ValueError, match=match):
      tasks.get(f"mvptr_stage{stage}").make_loss(StepConfig(mvptr=section), None)
  # The paper's textual MCR without its head is refused when the loss first runs (before any
  # compilation), naming both fields.
  loss = tasks.get("mvptr_stage1").make_loss(StepConfig(mvptr={}), None)
  with pytest.raises(ValueError, match=r"mcr_s = 'paper'.*config\.model\.mvptr\.phrase_head"):
    loss(family.abstract(MvptrConfig.tiny()), {}, None, True)
  for name in ("official_th", "params_dir", "beit_path"):
    with pytest.raises(ValueError, match=rf"config\.init\.{name}: not a weight source of an MVPTR"):
      init = init_lib.InitConfig(**{name: "x"})
      init_lib.initialize(init, MvptrConfig.tiny(), _mesh(), jax.random.key(0))


def test_vqa_and_ve_configs_are_the_official_settings():
  from configs.mvptr import snli_ve, vqa
  from x2vlm_jax import tasks_mvptr_finetune

  opts = "spec=d/train.json,pairs=6400,val=d/val.json,stage2=runs/s2"
  want = {  # batch, lr, steps (epochs x pairs / batch), lengths, heads, answers, dropout
    "mvptr_vqa": (256, 5e-5, 625, (128, 5, 30, 50), "vqa", 3129, 0.3),
    "mvptr_ve": (512, 4e-5, 313, (70, 5, 20, 70), "ve", 0, 0.1),
  }
  for module in (vqa, snli_ve):
    c = module.get_config(opts)
    batch, lr, steps, lengths, heads, answers, dropout = want[c.task]
    assert (c.batch.image, c.optim.lr, c.train.total_steps) == (batch, lr, steps)
    assert (c.optim.weight_decay, c.optim.warmup_steps, c.optim.clip_norm) == (0.05, 0, 1.0)
    m = rc.model_config(c)
    assert (m.heads, m.qa_answers, m.dropout, m.vocab_size) == (heads, answers, dropout, 86051)
    s = rc.mvptr_rc.streams_config(c, m, rc.batch_sizes(c, m, _mesh(), 1))
    assert s.rows == "task" and s.source["spec"] == "d/train.json"
    assert (s.spec.max_tokens, s.spec.max_phrases, s.spec.max_tags, s.spec.max_regions) == lengths
    assert s.spec.word_rate == s.spec.tag_rate == s.spec.phrase_rate == 0  # nothing masked
    e = rc.eval_config(c.eval)
    assert e.names == (c.task,) and getattr(e, c.task).data == (
      ("val", ({"type": "task", "spec": "d/val.json"},)),
    )
    assert c.train.select_metric.startswith(f"eval/{c.task}/val/")
    assert rc.task(c).evaluators == (c.task,)
    with pytest.raises(ValueError, match=rf"unknown keys \['x'\] for {c.task}"):
      tasks_mvptr_finetune.settings(heads, {"x": 1})
  # Every parameter of the VQA head has its official group (its LayerNorm weight: no decay).
  state = nnx.state(family.abstract(MvptrConfig.tiny(heads="vqa", qa_answers=5)), nnx.Param)
  groups = {
    p: optim.param_group(p, (), optim.OptimConfig()).name for p in treepath.flatten_state(state)
  }
  assert groups["vqa_head.norm.scale"] == groups["vqa_head.bias"] == "base/no_decay"
  assert groups["vqa_head.decoder"] == groups["vqa_head.dense.kernel"] == "base/decay"


def test_grounding_config_is_the_official_setting():
  from configs.mvptr import grounding

  c = grounding.get_config("spec=d/train/oscar.yaml,rows=5120,val=d/val/oscar.yaml,stage2=runs/s2")
  # 64 per GPU x 8, lr 4e-5, 25 epochs over 5,120 phrase rows, lengths 30 / 5 / 20 / 50.
  assert (c.batch.image, c.optim.lr, c.train.total_steps, c.train.eval_every) == (
    512,
    4e-5,
    250,
    10,
  )
  assert (c.optim.weight_decay, c.optim.warmup_steps, c.optim.clip_norm) == (0.05, 0, 1.0)
  m = rc.model_config(c)
  assert m.heads == "grounding" and m.vocab_size == 86051
  s = rc.mvptr_rc.streams_config(c, m, rc.batch_sizes(c, m, _mesh(), 1))
  assert (s.spec.max_tokens, s.spec.max_phrases, s.spec.max_tags, s.spec.max_regions) == (
    30, 5, 20, 50,
  )  # fmt: skip
  e = rc.eval_config(c.eval)
  assert e.names == ("mvptr_grounding",) and c.loss.mvptr.grounding == "paper"
  assert e.mvptr_grounding.variant == "paper"
  code = grounding.get_config("spec=a,rows=1,val=b,stage2=c,variant=code")
  assert code.loss.mvptr.grounding == "code" and code.eval.mvptr_grounding.variant == "code"
  assert rc.task(c).evaluators == ("mvptr_grounding",)
