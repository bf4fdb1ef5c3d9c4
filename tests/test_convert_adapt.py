"""Adapting whole-model weights to another resolution / frame count (`convert/adapt.py`): the
frame embedding on hand-made values, the rel-pos tables against the resize function, an
official fine-tuning-layout state dict with `roberta.` keys, and the errors."""

import dataclasses

import numpy as np
import pytest
from convert_testlib import random_official

from x2vlm_jax import treepath
from x2vlm_jax.convert import adapt
from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import official as O
from x2vlm_jax.convert import official_spec as S
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.models.vision import resize_rel_pos_bias

TINY = ModelConfig.tiny()  # 64 px: patch grid 4, 52-row tables, 3 heads, 2 blocks
MLM_HEAD = [
  "mlm_head.bias",
  "mlm_head.dense.bias",
  "mlm_head.dense.kernel",
  "mlm_head.norm.bias",
  "mlm_head.norm.scale",
]


def _at(cfg, image_size=None, frame_len=None):
  v = dataclasses.replace(cfg.vision, image_size=image_size or cfg.vision.image_size)
  return cfg.replace(vision=v, frame_len=cfg.frame_len if frame_len is None else frame_len)


def _random_params(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return {
    p: rng.standard_normal(s).astype(d)
    for p, (s, d) in treepath.flatten_dict(O.param_shapes(cfg)).items()
  }


def test_frame_embedding_grows_and_shrinks_by_hand():
  src = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
  init = -np.arange(5 * 4, dtype=np.float32).reshape(5, 4) - 100
  out, note = adapt.resize_frame_embed(src, 5, init)
  np.testing.assert_array_equal(out[:3], src)
  np.testing.assert_array_equal(out[3:], init[3:])
  assert "rows 0-2 copied" in note and "rows 3-4 keep their initial values" in note

  src5 = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
  out, note = adapt.resize_frame_embed(src5, 2)  # no init needed to shrink
  np.testing.assert_array_equal(out, src5[:2])
  assert "rows 0-1 copied" in note and "source rows 2-4 dropped" in note
  assert "initial values" not in note
  with pytest.raises(ValueError, match="init"):
    adapt.resize_frame_embed(src, 5)


@pytest.mark.parametrize("frames", [(3, 5), (5, 2)])
def test_frame_embedding_through_adapt_params(frames):
  f_src, f_dst = frames
  src_cfg, dst_cfg = _at(TINY, frame_len=f_src), _at(TINY, frame_len=f_dst)
  params = _random_params(src_cfg)
  init = np.full((f_dst, TINY.vision.width), 7.0, np.float32)
  out, notes, fresh = adapt.adapt_params(params, src_cfg, dst_cfg, init=lambda p: init)
  flat = treepath.flatten_dict(out)
  n = min(frames)
  np.testing.assert_array_equal(flat["frame_embed"][:n], params["frame_embed"][:n])
  np.testing.assert_array_equal(flat["frame_embed"][n:], init[n:])
  assert flat["frame_embed"].shape == (f_dst, TINY.vision.width)
  # The whole parameter is fresh, as the official loader leaves it in `init_params`.
  assert fresh == ("frame_embed",)
  assert any(n.startswith("frame_embed:") for n in notes)
  for p, v in params.items():  # everything else is passed through untouched
    if p != "frame_embed":
      assert flat[p] is v, p


def test_rel_pos_tables_resized_with_the_resize_function():
  src_cfg, dst_cfg = TINY, _at(TINY, image_size=96)  # grid 4 -> 6
  params = _random_params(src_cfg)
  out, notes, fresh = adapt.adapt_params(params, src_cfg, dst_cfg)
  got = treepath.flatten_dict(out)[adapt.REL_POS]
  src = params[adapt.REL_POS]
  assert got.shape == (2, 11 * 11 + 3, 3) and fresh == ()
  for i in range(2):
    np.testing.assert_array_equal(got[i], resize_rel_pos_bias(src[i], 4, 6))
  assert any("tables resized" in n for n in notes)
  # Same configuration: nothing changes, nothing is fresh.
  out, notes, fresh = adapt.adapt_params(params, src_cfg, src_cfg)
  assert notes == [] and fresh == () and treepath.flatten_dict(out).keys() == params.keys()


def test_missing_dropped_and_errors():
  src_cfg = _at(TINY, frame_len=3)
  params = _random_params(src_cfg)
  # An image model from a video checkpoint: the frame embedding is dropped; a source without
  # the MLM head leaves it fresh.
  partial = {p: v for p, v in params.items() if not p.startswith("mlm_head")}
  out, notes, fresh = adapt.adapt_params(partial, src_cfg, TINY)
  assert "frame_embed" not in out and any("frame_embed: dropped" in n for n in notes)
  assert list(fresh) == MLM_HEAD
  # Anything but the tables and the frame embedding must keep its shape.
  wide = TINY.replace(embed_dim=32)
  with pytest.raises(C.ConversionError, match=r"vision_proj.kernel: source shape \(36, 24\)"):
    adapt.adapt_params(_random_params(TINY), TINY, wide)
  with pytest.raises(C.ConversionError, match="pooler.kernel: not a parameter"):
    adapt.adapt_params({"pooler.kernel": np.zeros((2, 2))}, TINY, TINY)
  with pytest.raises(C.ConversionError, match="patch size"):
    small_patch = _at(TINY).replace(vision=dataclasses.replace(TINY.vision, patch_size=8))
    adapt.adapt_params(_random_params(TINY), TINY, small_patch)
  plan = adapt.plan_adaptation({adapt.REL_POS: (2, 52, 3)}, TINY, _at(TINY, image_size=96))
  assert plan.resize == (adapt.REL_POS,) and "temp" in plan.missing


def test_official_finetune_layout_with_roberta_at_new_resolution_and_frames():
  src_cfg = _at(TINY, frame_len=3)  # 64 px, 3 frames
  dst_cfg = _at(TINY, image_size=96, frame_len=5)
  sd = random_official(src_cfg, layout=S.FINETUNE)
  sd = {k.replace("text_encoder.", "text_encoder.roberta.", 1): v for k, v in sd.items()}
  assert any(k.startswith("text_encoder.roberta.encoder.layer.3.") for k in sd)
  assert adapt.official_source_config(sd, dst_cfg) == src_cfg
  init = np.full((5, TINY.vision.width), -1.0, np.float32)
  params, report, fresh = adapt.official_params(sd, dst_cfg, init=lambda p: init)
  assert report.unexpected == [] and report.shape == [] and report.check == []
  assert sorted(report.missing) == MLM_HEAD
  assert fresh == tuple(sorted(MLM_HEAD + ["frame_embed"]))
  flat = treepath.flatten_dict(params)
  table = sd["vision_encoder.blocks.1.attn.relative_position_bias_table"]
  np.testing.assert_array_equal(flat[adapt.REL_POS][1], resize_rel_pos_bias(table, 4, 6))
  frames = sd["absolute_frame_pos_embed"].reshape(3, -1)
  np.testing.assert_array_equal(flat["frame_embed"], np.concatenate([frames, init[3:]]))
  np.testing.assert_array_equal(
    flat["text.embeddings.word"], sd["text_encoder.roberta.embeddings.word_embeddings.weight"]
  )
  # The pre-training layout (with `bert.` and the MLM head) at the same resolution: no fresh
  # parameters and nothing resized.
  params, report, fresh = adapt.official_params(random_official(src_cfg), src_cfg)
  assert fresh == () and report.missing == [] and not any("resized" in n for n in report.notes)


def test_official_errors_stay_strict():
  sd = random_official(TINY, layout=S.FINETUNE)
  with pytest.raises(C.ConversionError, match="cls_head.weight"):
    adapt.official_params({**sd, "cls_head.weight": np.zeros((2, 2), np.float32)}, TINY)
  fewer = {k: v for k, v in sd.items() if not k.startswith("vision_encoder.blocks.1.")}
  with pytest.raises(C.ConversionError, match=r"lacks layers.*vision.blocks"):
    adapt.official_params(fewer, TINY)
  with pytest.raises(C.ConversionError, match="not \\(2P-1\\)"):
    bad = dict(sd)
    bad["vision_encoder.blocks.0.attn.relative_position_bias_table"] = np.zeros((50, 3))
    adapt.official_source_config(bad, TINY)
