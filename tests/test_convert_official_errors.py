"""Official X2-VLM state dict <-> our params: mismatches named, the fine-tuning layout, config
recovery, resolution change on import, and the command line."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from convert_testlib import BASE_WIDTH_SHALLOW, TINY_ABS_POS, assert_same_state, random_official

from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import official as O
from x2vlm_jax.convert import official_spec as S
from x2vlm_jax.convert.official_config import infer_config
from x2vlm_jax.convert.safetensors_io import load_safetensors, save_safetensors
from x2vlm_jax.models.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Mismatch handling.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "edit,kind,name",
  [
    (
      lambda sd: sd.update({"vision_encoder.blocks.0.attn.qkv.bias": np.zeros(108, np.float32)}),
      "unexpected",
      "vision_encoder.blocks.0.attn.qkv.bias",
    ),
    (
      lambda sd: sd.pop("text_encoder.bert.encoder.layer.3.crossattention.self.value.bias"),
      "missing",
      "fusion.layers.cross_attn.value.bias[1]",
    ),
    (
      lambda sd: sd.update({"vision_proj.weight": np.zeros((24, 35), np.float32)}),
      "shape",
      "vision_proj.weight",
    ),
    (
      lambda sd: sd.update(
        {
          "text_encoder.cls.predictions.decoder.weight": sd[
            "text_encoder.cls.predictions.decoder.weight"
          ]
          + 1
        }
      ),
      "check",
      "text_encoder.cls.predictions.decoder.weight",
    ),
    (
      lambda sd: sd.update(
        {
          "vision_encoder.blocks.1.attn.relative_position_index": S.relative_position_index(
            4
          ).T.copy()
        }
      ),
      "check",
      "vision_encoder.blocks.1.attn.relative_position_index",
    ),
    (
      lambda sd: sd.update(
        {"text_encoder.bert.encoder.layer.4.output.dense.bias": np.zeros(40, np.float32)}
      ),
      "unexpected",
      "text_encoder.bert.encoder.layer.4.output.dense.bias",
    ),
  ],
  ids=[
    "extra_key",
    "missing_key",
    "wrong_shape",
    "tied_differs",
    "bad_buffer",
    "layer_beyond_depth",
  ],
)
def test_mismatches_raise_naming_the_key(edit, kind, name):
  cfg = ModelConfig.tiny()
  sd = random_official(cfg)
  edit(sd)
  with pytest.raises(C.ConversionError) as e:
    O.official_to_params(sd, cfg)
  assert name in str(e.value) and any(name in x for x in getattr(e.value.report, kind))
  _, report = O.official_to_params(sd, cfg, strict=False)  # non-strict: reported, not raised
  assert any(name in x for x in getattr(report, kind))


def test_finetune_layout_import_reports_missing_mlm_head():
  cfg = ModelConfig.tiny()
  sd = random_official(cfg, layout=S.FINETUNE)
  assert S.detect_layout(sd) == S.FINETUNE and not any(".bert." in k or ".cls." in k for k in sd)
  with pytest.raises(C.ConversionError, match="mlm_head.bias"):
    O.official_to_params(sd, cfg)
  params, report = O.official_to_params(sd, cfg, allow={"missing"})
  assert sorted(report.missing) == [
    "mlm_head.bias",
    "mlm_head.dense.bias",
    "mlm_head.dense.kernel",
    "mlm_head.norm.bias",
    "mlm_head.norm.scale",
  ]
  assert "mlm_head" not in params
  assert_same_state(sd, O.params_to_official(params, cfg, layout=S.FINETUNE))


def test_infer_config_from_state_and_yaml_keys():
  cfg = ModelConfig.tiny(frame_len=3)
  sd = random_official(cfg)
  with pytest.raises(ValueError, match="--num-heads"):
    infer_config(sd, variant="tiny")
  got, src, _ = infer_config(sd, variant="tiny", num_heads=4)
  assert got == cfg and src == 64
  got, _, _ = infer_config(
    sd, {"text_fusion_start_at": 2, "x2vlm_jax": {"text_num_heads": 4}}, variant="tiny"
  )
  assert got == cfg
  with pytest.raises(ValueError, match="first layer with cross-attention is 2"):
    infer_config(sd, variant="tiny", num_heads=4, text_layers=3)
  base_like = {k: np.empty(s, d) for k, (s, d) in S.official_state_spec(BASE_WIDTH_SHALLOW).items()}
  got, src, _ = infer_config(base_like)
  assert got == BASE_WIDTH_SHALLOW and src == 224
  got, src, _ = infer_config(base_like, image_size=384)
  assert got.vision.image_size == 384 and src == 224
  # The absolute position embedding is recognised by its key, and not resized.
  abs_sd = random_official(TINY_ABS_POS)
  got, _, notes = infer_config(abs_sd, variant="tiny", num_heads=4)
  assert got == TINY_ABS_POS and any("pos_embed" in n for n in notes)
  with pytest.raises(ValueError, match="absolute position embedding"):
    O.official_to_params(
      abs_sd,
      dataclasses.replace(
        TINY_ABS_POS, vision=dataclasses.replace(TINY_ABS_POS.vision, image_size=96)
      ),
      source_image_size=64,
    )


def test_resolution_change_on_import():
  resize_rel_pos_bias = pytest.importorskip("x2vlm_jax.models.vision").resize_rel_pos_bias

  src_cfg = ModelConfig.tiny()  # 64 px -> grid 4
  dst_cfg = ModelConfig.tiny(vision=dataclasses.replace(src_cfg.vision, image_size=96))  # grid 6
  sd = random_official(src_cfg)
  params, report = O.official_to_params(sd, dst_cfg, source_image_size=64)
  table = params["vision"]["blocks"]["attn"]["rel_pos_bias"]
  assert table.shape == (2, 11 * 11 + 3, 3)
  np.testing.assert_array_equal(
    table[1],
    resize_rel_pos_bias(sd["vision_encoder.blocks.1.attn.relative_position_bias_table"], 4, 6),
  )
  assert any("resized" in n for n in report.notes)
  out = O.params_to_official(params, dst_cfg)
  assert out["vision_encoder.blocks.0.attn.relative_position_index"].shape == (37, 37)
  # The source buffers must match the claimed source grid.
  with pytest.raises(C.ConversionError, match="does not fit the source grid 5"):
    O.official_to_params(sd, dst_cfg, source_image_size=80)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run(
    [sys.executable, "-m", "x2vlm_jax.convert", *map(str, args)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_round_trip_and_errors(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  from x2vlm_jax.convert.__main__ import main
  from x2vlm_jax.convert.torch_io import load_th

  cfg = ModelConfig.tiny()
  sd = random_official(cfg)
  src = tmp_path / "src.th"
  torch.save(
    {
      "model": {k: torch.from_numpy(v) for k, v in sd.items()},
      "config": {"image_res": 64, "text_fusion_start_at": 2},
    },
    src,
  )
  # The real entry point, in subprocesses, for the .th -> ours -> .th round trip.
  r = _cli("official-to-jax", src, tmp_path / "jax", "--variant", "tiny", "--num-heads", "4")
  assert r.returncode == 0, r.stdout + r.stderr
  assert "missing 0, unexpected 0" in r.stdout
  assert json.loads((tmp_path / "jax" / "model_config.json").read_text())["text"]["num_heads"] == 4
  r = _cli("jax-to-official", tmp_path / "jax", tmp_path / "back.th")
  assert r.returncode == 0, r.stdout + r.stderr
  back, config, _ = load_th(tmp_path / "back.th")
  assert_same_state(sd, back)
  # The other commands in-process (same `main`, without paying the start-up cost again).
  assert main(["jax-to-safetensors", str(tmp_path / "jax"), str(tmp_path / "a.safetensors")]) == 0
  assert_same_state(sd, load_safetensors(tmp_path / "a.safetensors")[0], ordered=False)
  assert (
    main(["official-to-safetensors", str(tmp_path / "back.th"), str(tmp_path / "b.safetensors")])
    == 0
  )
  assert_same_state(sd, load_safetensors(tmp_path / "b.safetensors")[0], ordered=False)
  assert main(["official-to-jax", str(tmp_path / "b.safetensors"), str(tmp_path / "jax2")]) == 0
  capsys.readouterr()
  # Each kind of mismatch: non-zero exit naming the key, nothing written; allowed on request.
  bad_cases = {
    "unexpected": (
      "vision_encoder.head.weight",
      lambda d: d.update({"vision_encoder.head.weight": np.zeros((3, 36), np.float32)}),
    ),
    "missing": ("vision.fc_norm.scale", lambda d: d.pop("vision_encoder.fc_norm.weight")),
    "shape": ("text_proj.bias", lambda d: d.update({"text_proj.bias": np.zeros(23, np.float32)})),
  }
  for kind, (name, edit) in bad_cases.items():
    bad = dict(sd)
    edit(bad)
    save_safetensors(tmp_path / f"{kind}.safetensors", bad, {"x2vlm_jax": {"text_num_heads": 4}})
    out = tmp_path / f"out_{kind}"
    assert (
      main(
        ["official-to-jax", str(tmp_path / f"{kind}.safetensors"), str(out), "--variant", "tiny"]
      )
      == 1
    )
    err = capsys.readouterr()
    assert name in err.out + err.err and not out.exists(), kind
  assert (
    main(
      [
        "official-to-jax",
        str(tmp_path / "unexpected.safetensors"),
        str(tmp_path / "ok"),
        "--variant",
        "tiny",
        "--allow-unexpected",
      ]
    )
    == 0
  )
  assert main(["official-to-jax", str(tmp_path / "nope.th"), str(tmp_path / "x")]) == 2
