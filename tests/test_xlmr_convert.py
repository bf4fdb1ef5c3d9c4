"""The official XVLMPlus layout (multilingual X2-VLM, `cclm_x2vlm_*.th`) <-> ours: key list,
sizes, strict bit-exact round trips at tiny and base widths (docs/multilingual.md#conversion)."""

import dataclasses

import numpy as np
import pytest
from convert_testlib import assert_same_state, random_official

from x2vlm_jax import treepath
from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import official as O
from x2vlm_jax.convert import official_spec as S
from x2vlm_jax.models.config import FusionConfig, ModelConfig, VisionConfig

# XLM-R base widths (768, 12 heads, 514 positions, 224 px) with one layer per tower and a
# 1,000-row vocabulary: every width-dependent shape of the base model at ~25M floats (the
# full-size base file: test_plus_round_trip_full_base).
XLMR_BASE_SHALLOW = ModelConfig.xlmr_base(
  vision=VisionConfig(depth=1),
  text=dataclasses.replace(ModelConfig.xlmr_base().text, depth=1, vocab_size=1000),
  fusion=FusionConfig(depth=1),
)


@pytest.mark.parametrize("size", ["base", "large"])
def test_plus_spec_sizes_and_keys(size):
  cfg = getattr(ModelConfig, f"xlmr_{size}")()
  spec = S.official_state_spec(cfg, S.PLUS_PRETRAIN)
  # The learned size of the official key list equals the model built from the same config.
  assert S.count_parameters(spec) == {"base": 615_540_825, "large": 1_225_073_817}[size]
  d, tl = cfg.text.width, cfg.text.depth
  keys = list(spec)
  assert keys[:2] == ["temp", "vision_encoder.cls_token"]
  assert keys[-1] == "mlm_head.predictions.decoder.bias"
  assert spec["text_encoder.embeddings.position_ids"] == ((1, 514), np.int64)
  assert spec["text_encoder.embeddings.word_embeddings.weight"][0] == (250002, d)
  assert spec["text_encoder.embeddings.token_type_embeddings.weight"][0] == (1, d)
  assert spec["mlm_head.predictions.decoder.weight"][0] == (250002, d)
  assert f"text_encoder.encoder.layer.{tl - 1}.output.LayerNorm.bias" in spec
  assert not any("crossattention" in k for k in keys if k.startswith("text_encoder."))
  assert spec["cross_encoder.encoder.layer.5.crossattention.self.key.weight"][0] == (
    d,
    cfg.vision.width,
  )
  assert "cross_encoder.encoder.layer.6.output.dense.bias" not in spec
  assert keys.index("cross_encoder.encoder.layer.0.attention.self.query.weight") > keys.index(
    f"text_encoder.encoder.layer.{tl - 1}.output.LayerNorm.bias"
  )
  fine = S.official_state_spec(cfg, S.PLUS_FINETUNE)
  assert set(spec) - set(fine) == {k for k in spec if k.startswith("mlm_head.")}


@pytest.mark.parametrize("cfg", [ModelConfig.xlmr_tiny(), XLMR_BASE_SHALLOW], ids=["tiny", "base"])
def test_plus_round_trip_bit_exact(cfg):
  sd = random_official(cfg, layout=S.PLUS_PRETRAIN)
  assert S.detect_layout(sd) == S.PLUS_PRETRAIN
  params, report = O.official_to_params(sd, cfg)
  assert not (report.missing or report.unexpected or report.shape or report.check)
  assert len(report.matched) == len(sd)
  want = treepath.flatten_dict(O.param_shapes(cfg))
  got = {k: (v.shape, v.dtype) for k, v in treepath.flatten_dict(params).items()}
  assert got == want
  back = O.params_to_official(params, cfg)
  assert_same_state(sd, back)
  # The decoder weight is its own parameter (random here, unlike the word embeddings).
  assert not np.array_equal(
    back["mlm_head.predictions.decoder.weight"],
    back["text_encoder.embeddings.word_embeddings.weight"],
  )


def test_plus_round_trip_full_base():
  """Every key of the base XVLMPlus file at its real shape (12 + 6 + 12 layers, the 250,002-row
  embedding and decoder: 615,540,825 floats, 2.5 GB): ours and back, bit-identical. Measured:
  ~15 s and 4.6 GB peak in one process."""
  cfg = ModelConfig.xlmr_base()
  sd = random_official(cfg, layout=S.PLUS_PRETRAIN, normal=False)
  params, report = O.official_to_params(sd, cfg)
  assert not (report.missing or report.unexpected or report.shape or report.check)
  assert len(report.matched) == len(sd) == len(S.official_state_spec(cfg, S.PLUS_PRETRAIN))
  n = sum(v.size for v in treepath.flatten_dict(params).values())
  assert n == 615_540_825
  back = O.params_to_official(params, cfg)
  del params
  assert_same_state(sd, back)


def test_plus_layout_lands_where_the_contract_says():
  cfg = ModelConfig.xlmr_tiny()
  sd = random_official(cfg, layout=S.PLUS_PRETRAIN)
  p, _ = O.official_to_params(sd, cfg)
  d = cfg.text.width
  assert np.array_equal(
    p["fusion"]["layers"]["cross_attn"]["value"]["kernel"][1].reshape(cfg.vision.width, d),
    sd["cross_encoder.encoder.layer.1.crossattention.self.value.weight"].T,
  )
  assert np.array_equal(
    p["text"]["layers"]["mlp"]["fc1"]["kernel"][1],
    sd["text_encoder.encoder.layer.1.intermediate.dense.weight"].T,
  )
  assert np.array_equal(p["mlm_head"]["decoder"], sd["mlm_head.predictions.decoder.weight"])
  assert np.array_equal(
    p["text"]["embeddings"]["position"], sd["text_encoder.embeddings.position_embeddings.weight"]
  )


def test_plus_finetune_layout_and_errors():
  cfg = ModelConfig.xlmr_tiny()
  sd = random_official(cfg, layout=S.PLUS_FINETUNE)
  assert S.detect_layout(sd) == S.PLUS_FINETUNE
  with pytest.raises(C.ConversionError, match="mlm_head.decoder"):
    O.official_to_params(sd, cfg)
  params, report = O.official_to_params(sd, cfg, allow={"missing"})
  assert sorted(report.missing)[0] == "mlm_head.bias" and "mlm_head.decoder" in report.missing
  assert_same_state(sd, O.params_to_official(params, cfg, layout=S.PLUS_FINETUNE))
  with pytest.raises(ValueError, match="does not fit"):
    O.params_to_official(params, cfg, layout=S.FINETUNE)
  bad = dict(random_official(cfg, layout=S.PLUS_PRETRAIN))
  bad["mlm_head.predictions.decoder.bias"] = bad["mlm_head.predictions.decoder.bias"] + 1
  with pytest.raises(C.ConversionError, match="decoder.bias"):
    O.official_to_params(bad, cfg)
  # An English (XVLM) config refuses the XVLMPlus file instead of guessing.
  with pytest.raises(C.ConversionError):
    O.official_to_params(sd, ModelConfig.tiny())


def test_cli_round_trip_infers_the_plus_config(tmp_path):
  """A CCLM-layout file -> our params -> an official .th / safetensors, with the config read
  off the shapes (no flags), and the .th written with the tied bias sharing storage."""
  from x2vlm_jax.convert.__main__ import main
  from x2vlm_jax.convert.official_config import infer_config
  from x2vlm_jax.convert.safetensors_io import load_safetensors, save_safetensors

  cfg = ModelConfig.xlmr_tiny()
  sd = random_official(cfg, layout=S.PLUS_PRETRAIN)
  with pytest.raises(ValueError, match="head count"):
    infer_config(sd, None)
  got, _, _ = infer_config(sd, None, variant="xlmr_base", num_heads=4)
  assert got.text == cfg.text
  assert (got.fusion.depth, got.fusion.mlp_dim, got.xvlm_plus) == (2, 56, True)
  save_safetensors(tmp_path / "cclm.safetensors", sd, None)
  argv = ["--variant", "xlmr_base", "--num-heads", "4"]
  assert (
    main(["official-to-jax", str(tmp_path / "cclm.safetensors"), str(tmp_path / "p"), *argv]) == 0
  )
  assert main(["jax-to-safetensors", str(tmp_path / "p"), str(tmp_path / "back.safetensors")]) == 0
  back, config = load_safetensors(tmp_path / "back.safetensors")[:2]
  assert_same_state(sd, back, ordered=False)  # safetensors stores its keys sorted
  assert config["text_num_hidden_layers"] == 2 and config["cross_num_hidden_layers"] == 2
  torch = pytest.importorskip("torch")
  assert main(["jax-to-official", str(tmp_path / "p"), str(tmp_path / "back.th")]) == 0
  th = torch.load(tmp_path / "back.th", weights_only=True)["model"]
  assert list(th) == list(sd)
  p = "mlm_head.predictions."
  assert th[p + "decoder.bias"].data_ptr() == th[p + "bias"].data_ptr()
  assert (
    th[p + "decoder.weight"].data_ptr()
    != th["text_encoder.embeddings.word_embeddings.weight"].data_ptr()
  )


def test_plus_from_english_follows_load_pretrained_xvlm():
  """The paper's path: English X2-VLM file + XLM-R weights -> the multilingual model."""
  from convert_testlib import random_official as english_random

  from x2vlm_jax.convert import official_plus

  cfg = ModelConfig.xlmr_tiny()
  eng_cfg = ModelConfig.tiny()  # same vision, 40-wide text / fusion
  eng = english_random(eng_cfg)
  xlmr = {
    k[len("text_encoder.") :]: v
    for k, v in random_official(cfg, layout=S.PLUS_PRETRAIN, seed=3).items()
    if k.startswith("text_encoder.")
  }
  params, notes = official_plus.plus_from_english(eng, eng_cfg, xlmr, cfg)
  t = "text_encoder.bert.encoder.layer."
  assert np.array_equal(  # official layer 2 (= English text depth) -> cross encoder layer 0
    params["fusion"]["layers"]["mlp"]["fc1"]["kernel"][0], eng[t + "2.intermediate.dense.weight"].T
  )
  assert np.array_equal(
    params["text"]["embeddings"]["word"], xlmr["embeddings.word_embeddings.weight"]
  )
  assert np.array_equal(
    params["mlm_head"]["norm"]["scale"],
    eng["text_encoder.cls.predictions.transform.LayerNorm.weight"],
  )
  assert "bias" not in params["mlm_head"] and "decoder" not in params["mlm_head"]
  flat = set(treepath.flatten_dict(params))
  want = set(treepath.flatten_dict(O.param_shapes(cfg)))
  assert want - flat == {"mlm_head.bias", "mlm_head.decoder"} and flat <= want
  with pytest.raises(ValueError, match="text width"):
    official_plus.plus_from_english(
      eng,
      eng_cfg,
      xlmr,
      ModelConfig.xlmr_tiny().replace(
        text=dataclasses.replace(cfg.text, width=48),
        fusion=FusionConfig(depth=2, num_heads=4, mlp_dim=56),
      ),
    )
