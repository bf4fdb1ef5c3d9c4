"""Captioning end to end on the shapes world: Karpathy-format files (`synthetic_tasks`) through
the production reader, the FG-free example builder, the caption task's loss in the one training
loop (`train_lib`) and the captioning evaluator; a short fine-tune from a saved "pre-trained"
params directory beats that model's BLEU and CIDEr on held-out images. Also the FG-free layout
and the loss against hand-made / NumPy references."""

import dataclasses
import json
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.finetune import captioning_coco, tiny_caption
from data_pipelines import caption_examples as CE
from data_pipelines import features as F
from data_pipelines import synthetic_tasks
from data_pipelines.text_ops import Tokenizer
from x2vlm_jax import assets, optim, params_io, sharding, train_lib
from x2vlm_jax import run_config as rc
from x2vlm_jax import tasks_caption as tc
from x2vlm_jax.evaluators import captioning
from x2vlm_jax.evaluators import run as eval_run
from x2vlm_jax.models.x2vlm import create_sharded

BLEU4 = "eval/caption/val/bleu_4"


def test_fg_free_layout_and_attention_match_the_official_construction():
  ids = [101, 7, 8, 9, 20, 21, 22, 102]  # [CLS] 3-piece prompt, 3 caption pieces, [SEP]
  f = CE.insert_masks(ids, [5, 7], mask_id=103, max_tokens=10, max_masks=3)
  assert f[F.CAPTION_IDS].tolist() == [101, 7, 8, 9, 20, 103, 21, 22, 103, 102, 0, 0, 0]
  assert f[F.CAPTION_POSITIONS].tolist() == [0, 1, 2, 3, 4, 5, 5, 6, 7, 7, 8, 9, 10]
  assert f[F.MLM_POSITIONS].tolist() == [5, 8, 0] and f[F.MLM_LABELS].tolist() == [21, 102, 0]
  assert f[F.MLM_WEIGHTS].tolist() == [1, 1, 0]
  # The official mask: lower-triangular, each [MASK] column zeroed but for its own row.
  want = np.tril(np.ones((13, 13), np.int32))
  for p in (5, 8):
    want[:, p] = 0
    want[p, p] = 1
  got = np.asarray(tc.caption_attention(jnp.asarray(f[F.CAPTION_INSERTED])[None]))[0]
  np.testing.assert_array_equal(got, want)


def test_smoothed_kl_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 11)).astype(np.float32)
  labels = np.array([[4, 5, 1], [7, 1, 1]])  # 1 = [CLS] here: a padded slot
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  got = float(
    tc.smoothed_kl(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights), 1, 0.1)
  )
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  total = 0.0
  for b in range(2):
    for m in range(3):
      q = np.full(11, 0.1 / 9)
      q[1] = 0.0
      q[labels[b, m]] = 0.9
      if labels[b, m] == 1:
        q[:] = 0.0
      kl = np.sum(np.where(q > 0, q * (np.log(np.where(q > 0, q, 1)) - logp[b, m]), 0))
      total += kl * weights[b, m]
  assert got == pytest.approx(total / (weights.sum() + 1e-5), rel=1e-5)


def test_example_from_a_karpathy_record(tmp_path):
  files = synthetic_tasks.write_retrieval(tmp_path, n_train=1, n_val=1, n_test=1)
  c = tiny_caption.get_config(f"data={tmp_path}")
  pre = rc.preproc_config(c, rc.model_config(c))
  tok = Tokenizer(str(assets.minilm_dir()), pre.max_tokens)
  from data_pipelines.source_specs import build_source

  rec = build_source(F.IMAGE, files.source("train"))[0]
  ex = CE.caption_example(dict(rec, id="r"), np.random.default_rng(0), pre, tok)
  n_prompt = len(tok.pieces("a picture of")[0])
  real = ex[F.CAPTION_INSERTED] == 0
  tokens = ex[F.CAPTION_IDS][real & (ex[F.CAPTION_IDS] > 0)]
  assert tokens[0] == tok.cls_id and tokens[-1] == tok.sep_id
  assert tok.decode(tokens) == "a picture of " + rec["captions"][0].lower()  # raw, not cleaned
  slots = ex[F.MLM_POSITIONS][ex[F.MLM_WEIGHTS] > 0]
  assert np.all(ex[F.CAPTION_IDS][slots] == tok.mask_id)
  assert np.all(ex[F.CAPTION_POSITIONS][slots] >= 1 + n_prompt)  # prompt never masked
  np.testing.assert_array_equal(
    ex[F.CAPTION_IDS][slots + 1], ex[F.MLM_LABELS][ex[F.MLM_WEIGHTS] > 0]
  )


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
  """The tiny model: a saved random "pre-trained" model evaluated, then fine-tuned from it."""
  d = tmp_path_factory.mktemp("caption_data")
  # One shape per plain scene ("a large red circle", ...): a random tiny model can learn to
  # name it in a CI-sized run; the held-out references add positions and other phrasings.
  world = {"max_shapes": 1, "noise_prob": 0.0}
  synthetic_tasks.write_retrieval(
    d, n_train=48, n_val=8, n_test=1, captions_per_image=1, world=world
  )
  c = tiny_caption.get_config(f"data={d}")
  model_cfg = rc.model_config(c)
  pretrained = tmp_path_factory.mktemp("caption_pretrained")
  # Built and evaluated on the run's mesh, so the run's evaluation reuses the compiled generator.
  mesh = sharding.make_mesh(c.mesh.to_dict())
  model = create_sharded(model_cfg, mesh, 3)
  params_io.save_params(pretrained, model_cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  tok = Tokenizer(str(assets.minilm_dir()), int(c.data.max_tokens))
  before = eval_run.evaluate(model, rc.eval_config(c.eval), tok, mesh, log=None)
  c.init.params_dir = str(pretrained)
  workdir = tmp_path_factory.mktemp("caption_run")
  train_lib.train_and_evaluate(c, workdir)
  return before, workdir


def test_finetuning_beats_the_pretrained_model_on_held_out_images(finetune):
  before, workdir = finetune
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  after = {k: v for rec in lines for k, v in rec["metrics"].items()}
  for name in ("bleu_1", "bleu_4", "rouge_l", "cider", "num_images"):
    assert f"eval/caption/val/{name}" in after
  assert after["eval/caption/val/num_images"] == 8
  # The tiny model learns the phrasing and the colour within 100 steps, the shape and size less
  # reliably, so exact 4-grams stay rare at this scale: BLEU-1..3 and CIDEr must rise clearly,
  # BLEU-4 must not fall (docs/finetuning.md#captioning).
  for name, gain in (("bleu_1", 20.0), ("bleu_3", 10.0), ("cider", 50.0)):
    key = f"eval/caption/val/{name}"
    assert after[key] > before[key] + gain, (name, before[key], after[key])
  assert after[BLEU4] >= before[BLEU4]
  losses = [
    rec["metrics"]["train/loss/caption/image"]
    for rec in lines
    if "train/loss/caption/image" in rec["metrics"]
  ]
  assert losses[-1] < losses[0]
  results = json.loads(
    (workdir / f"results_{tiny_caption.STEPS}" / "caption_result_val.json").read_text()
  )
  assert len(results) == 8 and all(set(r) == {"image_id", "caption"} for r in results)


def test_coco_config_builds_with_the_released_settings():
  c = captioning_coco.get_config("large")
  assert rc.task(c).name == "caption"
  e = rc.eval_config(c.eval).caption
  assert (e.num_beams, e.max_length, e.min_length, e.length_penalty) == (3, 50, 5, 0.0)
  assert rc.step_config(c).label_smoothing == 0.1
  assert (c.data.max_tokens, c.data.max_masks, c.data.mask_prob) == (40, 18, 0.6)
  assert rc.model_config(c).vision.image_size == 384
  assert rc.eval_config(c.eval).names == ("caption",)
  rc.loop_config(c)
  optim.OptimConfig(**c.optim.to_dict())
  # Decoding: max_length tokens by default; the official count (test batch 20 + 50 - the
  # 4-token prompt = 66 steps) on request.
  tok = types.SimpleNamespace(sep_id=102, mask_id=103)
  assert captioning.decode_settings(e, tok, 20, 4).max_length == 50
  quirk = dataclasses.replace(e, official_length_cap=True)
  assert captioning.decode_settings(quirk, tok, 20, 4).max_length == 66
