"""Official X2-VLM state dict <-> our params: the spec, bit-exact round trips, file formats."""

import os

import numpy as np
import pytest
from convert_testlib import BASE_WIDTH_SHALLOW, TINY_ABS_POS, assert_same_state, random_official

from x2vlm_jax import treepath
from x2vlm_jax.convert import official as O
from x2vlm_jax.convert import official_spec as S
from x2vlm_jax.convert.official_config import infer_config, official_config_dict
from x2vlm_jax.convert.safetensors_io import load_safetensors, save_safetensors
from x2vlm_jax.models.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# The spec (docs/fidelity.md#official-key-list).
# ---------------------------------------------------------------------------------------------


def test_spec_counts_and_order_base_and_large():
  base = S.official_state_spec(ModelConfig.base())
  assert len(base) == 587
  assert S.count_parameters(base) == 254_758_401
  keys = list(base)
  assert keys[:4] == [
    "temp",
    "vision_encoder.cls_token",
    "vision_encoder.patch_embed.proj.weight",
    "vision_encoder.patch_embed.proj.bias",
  ]
  assert keys[-1] == "bbox_head.3.bias"
  assert base["vision_encoder.blocks.0.attn.relative_position_index"] == ((197, 197), np.int64)
  assert base["vision_encoder.blocks.11.attn.relative_position_bias_table"][0] == (732, 12)
  assert base["text_encoder.bert.embeddings.position_ids"] == ((1, 512), np.int64)
  assert base["temp"] == ((), np.float32)
  assert base["text_encoder.bert.encoder.layer.17.crossattention.self.key.weight"][0] == (768, 768)
  assert "text_encoder.bert.encoder.layer.11.crossattention.self.key.weight" not in base
  # 17 entries per block, in the official order (docs/fidelity.md#official-key-list).
  block = [k.split("blocks.0.")[1] for k in keys if ".blocks.0." in k]
  assert block == [
    "gamma_1",
    "gamma_2",
    "norm1.weight",
    "norm1.bias",
    "attn.q_bias",
    "attn.v_bias",
    "attn.relative_position_bias_table",
    "attn.relative_position_index",
    "attn.qkv.weight",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
  ]
  assert sum(".layer.12." in k for k in keys) == 26 and sum(".layer.0." in k for k in keys) == 16
  video = S.official_state_spec(ModelConfig.base(frame_len=3))
  assert len(video) == 588 and list(video)[0] == "absolute_frame_pos_embed"
  assert video["absolute_frame_pos_embed"][0] == (1, 3, 1, 768)
  large = S.official_state_spec(ModelConfig.large())
  assert len(large) == 792 and S.count_parameters(large) == 592_952_129
  # Our tree holds exactly the learned scalars of the official file.
  for cfg in (ModelConfig.base(), ModelConfig.large()):
    ours = sum(int(np.prod(s)) for s, _ in treepath.flatten_dict(O.param_shapes(cfg)).values())
    assert ours == S.count_parameters(S.official_state_spec(cfg))


@pytest.mark.parametrize(
  "cfg",
  [ModelConfig.tiny(), ModelConfig.tiny(frame_len=3), ModelConfig.base(), ModelConfig.demo()],
  ids=["tiny", "tiny_video", "base", "demo_abs_pos"],
)
def test_param_table_matches_the_model(cfg):
  """The converter's shape table is the real model's param state (nnx.eval_shape, no memory)."""
  x2vlm = pytest.importorskip("x2vlm_jax.models.x2vlm")
  from flax import nnx

  state = nnx.state(x2vlm.abstract_model(cfg), nnx.Param)
  got = {
    k: (tuple(v.shape), np.dtype(v.dtype))
    for k, v in treepath.flatten_dict(nnx.to_pure_dict(state)).items()
  }
  assert got == treepath.flatten_dict(O.param_shapes(cfg))


def test_relative_position_index_formula():
  # R = 384: 2209 / 2210 / 2211 for num_rel 2212 (docs/fidelity.md#relative-position-bias)
  idx = S.relative_position_index(24)
  assert idx.shape == (577, 577) and idx.dtype == np.int64
  assert idx[0, 5] == 2209 and idx[5, 0] == 2210 and idx[0, 0] == 2211
  assert idx[1:, 1:].min() == 0 and idx[1:, 1:].max() == 47 * 47 - 1
  assert idx[1, 1] == 23 * 47 + 23  # zero offset sits at the grid centre
  # Brute force on a small grid.
  p = 3
  ref = S.relative_position_index(p)
  for a in range(p * p):
    for b in range(p * p):
      (ra, ca), (rb, cb) = divmod(a, p), divmod(b, p)
      assert ref[a + 1, b + 1] == (ra - rb + p - 1) * (2 * p - 1) + (ca - cb + p - 1)


# ---------------------------------------------------------------------------------------------
# Bit-exact round trips.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "cfg",
  [ModelConfig.tiny(), ModelConfig.tiny(frame_len=3), BASE_WIDTH_SHALLOW, TINY_ABS_POS],
  ids=["tiny", "tiny_video", "base_width_shallow", "tiny_abs_pos"],
)
def test_official_round_trip_bit_exact(cfg):
  sd = random_official(cfg)
  params, report = O.official_to_params(sd, cfg)
  assert not (report.missing or report.unexpected or report.shape or report.check)
  assert len(report.matched) == len(sd)
  # Our tree has exactly the contract's paths, shapes and dtypes.
  want = {k: v for k, v in treepath.flatten_dict(O.param_shapes(cfg)).items()}
  got = {k: (v.shape, v.dtype) for k, v in treepath.flatten_dict(params).items()}
  assert got == want
  back = O.params_to_official(params, cfg)
  assert_same_state(sd, back)
  for dup, primary in S.TIED.items():
    if dup in back:  # the answer decoder's ties exist only in a VQA model
      assert np.array_equal(back[dup], back[primary])


def test_layouts_land_where_the_contract_says():
  cfg = ModelConfig.tiny()
  sd = random_official(cfg)
  p, _ = O.official_to_params(sd, cfg)
  t = "text_encoder.bert.encoder.layer."
  dv, hv = cfg.vision.width, cfg.vision.num_heads
  dh = dv // hv
  qkv = sd["vision_encoder.blocks.1.attn.qkv.weight"]  # rows [q; k; v], heads contiguous
  # key head 2, feature 3, input 5 <- row D + 2*dh + 3 of the fused weight.
  assert p["vision"]["blocks"]["attn"]["qkv"]["kernel"][1, 5, 1, 2, 3] == qkv[dv + 2 * dh + 3, 5]
  assert np.array_equal(
    p["vision"]["blocks"]["attn"]["v_bias"][1].reshape(-1),
    sd["vision_encoder.blocks.1.attn.v_bias"],
  )
  assert np.array_equal(
    p["vision"]["patch_embed"]["kernel"][:, :, 2, 7],
    sd["vision_encoder.patch_embed.proj.weight"][7, 2],
  )
  # Official text layer 2 (= text.depth) is fusion layer 0.
  assert np.array_equal(
    p["fusion"]["layers"]["self_attn"]["query"]["kernel"][0].reshape(40, 40),
    sd[t + "2.attention.self.query.weight"].T,
  )
  assert np.array_equal(
    p["text"]["layers"]["attn"]["out"]["kernel"][1].reshape(40, 40),
    sd[t + "1.attention.output.dense.weight"].T,
  )
  assert np.array_equal(
    p["fusion"]["layers"]["cross_attn"]["key"]["kernel"][1].reshape(36, 40),
    sd[t + "3.crossattention.self.key.weight"].T,
  )
  assert np.array_equal(p["box_head"]["fc2"]["kernel"], sd["bbox_head.3.weight"].T)
  assert np.array_equal(p["itm_head"]["norm"]["scale"], sd["itm_head.1.weight"])
  assert p["temp"].shape == () and p["temp"] == sd["temp"]


def test_safetensors_round_trip(tmp_path):
  cfg = ModelConfig.tiny(frame_len=2)
  sd = random_official(cfg)
  path = tmp_path / "w.safetensors"
  save_safetensors(
    path, O.params_to_official(O.official_to_params(sd, cfg)[0], cfg), official_config_dict(cfg)
  )
  loaded, config = load_safetensors(path)
  assert_same_state(sd, loaded, ordered=False)
  cfg2, src, _ = infer_config(loaded, config, variant="tiny")
  assert cfg2 == cfg and src == 64
  assert_same_state(sd, O.params_to_official(O.official_to_params(loaded, cfg2)[0], cfg2))


def _spec_module(torch, cfg):
  """A torch module whose state_dict() has exactly the official names, shapes, dtypes and ties."""
  spec = S.official_state_spec(cfg)
  root = torch.nn.Module()
  for k, (shape, dtype) in spec.items():
    if k in S.TIED:
      continue
    *parents, leaf = k.split(".")
    mod = root
    for p in parents:
      if not hasattr(mod, p):
        mod.add_module(p, torch.nn.Module())
      mod = getattr(mod, p)
    if dtype == np.int64:
      mod.register_buffer(leaf, torch.zeros(shape, dtype=torch.int64))
    else:
      mod.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
  dec = root.text_encoder.cls.predictions
  dec.add_module("decoder", torch.nn.Module())
  dec.decoder.weight = root.text_encoder.bert.embeddings.word_embeddings.weight  # the tie
  dec.decoder.bias = dec.bias
  return root


def test_th_write_read_with_torch(tmp_path):
  torch = pytest.importorskip("torch")
  from x2vlm_jax.convert.torch_io import load_th, save_th

  cfg = ModelConfig.tiny()
  sd = random_official(cfg)
  params, _ = O.official_to_params(sd, cfg)
  path = tmp_path / "x.th"
  save_th(path, O.params_to_official(params, cfg), official_config_dict(cfg))
  raw = torch.load(path, weights_only=True)  # plain config: the safe unpickler suffices
  model = raw["model"]
  assert set(raw) == {"model", "config"} and list(model) == list(sd)
  assert model["temp"].shape == () and model["temp"].dtype == torch.float32
  assert model["vision_encoder.blocks.0.attn.relative_position_index"].dtype == torch.int64
  for dup, primary in S.TIED.items():  # shared storage, as module.state_dict() produces
    if dup in model:  # the answer decoder's ties exist only in a VQA model
      assert model[dup].untyped_storage().data_ptr() == model[primary].untyped_storage().data_ptr()
  module = _spec_module(torch, cfg)
  assert list(module.state_dict()) == list(sd)  # the spec order is state_dict() order
  module.load_state_dict(model, strict=True)
  loaded, config, notes = load_th(path)
  assert notes == [] and config["text_fusion_start_at"] == cfg.text.depth
  assert_same_state(sd, loaded)
  # A config that needs full unpickling (a non-allowlisted class) falls back and says so.
  import argparse

  torch.save(
    {
      "model": {k: torch.from_numpy(v) for k, v in sd.items()},
      "config": argparse.Namespace(image_res=64),
    },
    tmp_path / "o.th",
  )
  _, config, notes = load_th(tmp_path / "o.th")
  assert notes and "weights_only=False" in notes[0] and "image_res=64" in config
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "bare.th")
  bare, config, _ = load_th(tmp_path / "bare.th")
  assert config is None and list(bare) == list(sd)
