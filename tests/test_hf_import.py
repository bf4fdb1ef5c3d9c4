"""HF importers: MiniLM BERT -> text tower and BEiT -> vision tower, checked against transformers
(PyTorch) on CPU in float32, plus the strictness and layout handling of `convert/hf.py`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from x2vlm_jax import assets, treepath
from x2vlm_jax.convert import apply, hf, hf_beit
from x2vlm_jax.convert import common as C
from x2vlm_jax.models import FusionConfig, ModelConfig, VisionConfig, abstract_model
from x2vlm_jax.models.vision import CLIP_MEAN, CLIP_STD

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SENTENCES = [
  "a man riding a wave on top of a surfboard.",
  "Two dogs play with a red frisbee in the park!",
  "the cat",
  "An old, rusty bicycle leans against a brick wall near the station entrance.",
]


def host_model(cfg: ModelConfig, seed: int = 0):
  """The model with parameters filled on the host (no init program to compile): N(0, 0.02)."""
  graphdef, state = nnx.split(abstract_model(cfg))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def minilm():
  return assets.minilm_dir()


def test_text_config_from_hf(minilm):
  t = hf.text_config_from_hf(minilm)
  assert (t.width, t.depth, t.num_heads, t.mlp_dim, t.vocab_size) == (384, 6, 12, 1536, 30522)
  assert t.ln_eps == 1e-12 and t.max_positions == 512


def test_minilm_text_tower_matches_transformers(minilm):
  text = hf.text_config_from_hf(minilm)
  cfg = ModelConfig.tiny(text=text, fusion=FusionConfig(depth=2, num_heads=12, mlp_dim=1536))
  res = hf.load_bert(minilm, cfg)
  # Fusion layers 0..1 are copies of MiniLM's last two layers (4, 5); cross-attention fresh.
  np.testing.assert_array_equal(
    res.params["fusion"]["layers"]["self_attn"]["query"]["kernel"],
    res.params["text"]["layers"]["attn"]["query"]["kernel"][4:6],
  )
  assert "fusion.layers.cross_attn.key.kernel" in res.not_loaded
  assert "mlm_head.bias" in res.not_loaded  # the sentence-transformers file has no MLM head
  assert "text.layers.mlp.fc2.kernel" in res.loaded
  assert not res.loaded & res.not_loaded
  assert any("pooler" in n for n in res.report.notes)

  model = host_model(cfg)
  fresh = apply.apply_params(model, res.params)
  assert "vision_proj.kernel" in fresh and "fusion.layers.cross_norm.scale" in fresh
  assert "text.embeddings.word" not in fresh

  tok = transformers.AutoTokenizer.from_pretrained(str(minilm))
  enc = tok(SENTENCES, padding=True, return_tensors="np")
  assert enc["input_ids"][2, -1] == tok.pad_token_id  # padding is really exercised
  ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
  ours = np.asarray(nnx.jit(lambda m, i, k: m.encode_text(i, k))(model, ids, mask))

  ref = transformers.BertModel.from_pretrained(str(minilm), add_pooling_layer=False).eval()
  with torch.no_grad():
    theirs = ref(
      input_ids=torch.from_numpy(enc["input_ids"]),
      attention_mask=torch.from_numpy(enc["attention_mask"]),
    ).last_hidden_state.numpy()
  real = enc["attention_mask"].astype(bool)
  err = float(np.max(np.abs(ours[real] - theirs[real])))
  print(f"MiniLM text tower vs transformers BertModel: max |diff| = {err:.3e}")
  assert err <= 1e-5


def test_bert_key_variants_and_strictness(minilm):
  sd = hf.read_state_dict(minilm)
  text = hf.text_config_from_hf(minilm)
  cfg = ModelConfig.tiny(text=text, fusion=FusionConfig(depth=1, num_heads=12, mlp_dim=1536))
  # `bert.` prefix + TF-style gamma/beta + an MLM head with its tied decoder.
  rng = np.random.default_rng(0)
  v, d = sd["embeddings.word_embeddings.weight"].shape
  variant = {
    ("bert." + k)
    .replace("LayerNorm.weight", "LayerNorm.gamma")
    .replace("LayerNorm.bias", "LayerNorm.beta"): val
    for k, val in sd.items()
  }
  head = {
    "cls.predictions.transform.dense.weight": rng.standard_normal((d, d)).astype(np.float32),
    "cls.predictions.transform.dense.bias": np.zeros(d, np.float32),
    "cls.predictions.transform.LayerNorm.gamma": np.ones(d, np.float32),
    "cls.predictions.transform.LayerNorm.beta": np.zeros(d, np.float32),
    "cls.predictions.bias": rng.standard_normal(v).astype(np.float32),
  }
  head["cls.predictions.decoder.weight"] = sd["embeddings.word_embeddings.weight"]
  head["cls.predictions.decoder.bias"] = head["cls.predictions.bias"]
  res = hf.load_bert({**variant, **head}, cfg, fusion_layers=[2])
  np.testing.assert_array_equal(
    res.params["mlm_head"]["dense"]["kernel"], head["cls.predictions.transform.dense.weight"].T
  )
  np.testing.assert_array_equal(
    res.params["fusion"]["layers"]["mlp"]["fc1"]["kernel"][0],
    sd["encoder.layer.2.intermediate.dense.weight"].T,
  )
  q = sd["encoder.layer.3.attention.self.query.weight"]  # [H*dh, D] -> [D, H, dh]
  np.testing.assert_array_equal(
    res.params["text"]["layers"]["attn"]["query"]["kernel"][3], q.T.reshape(d, 12, d // 12)
  )
  assert not any(p.startswith("mlm_head") for p in res.not_loaded)

  # A tied decoder that differs from the word embeddings is caught.
  bad = {
    **variant,
    **head,
    "cls.predictions.decoder.weight": head["cls.predictions.decoder.weight"] + 1,
  }
  with pytest.raises(C.ConversionError, match="decoder.weight"):
    hf.load_bert(bad, cfg)
  # Unknown keys and missing keys raise, naming the key, unless allowed.
  with pytest.raises(C.ConversionError, match="surprise"):
    hf.load_bert({**sd, "surprise.weight": np.zeros(3, np.float32)}, cfg)
  partial = {k: val for k, val in sd.items() if "layer.1.output.dense" not in k}
  with pytest.raises(C.ConversionError, match=r"text\.layers\.mlp\.fc2\.kernel\[1\]"):
    hf.load_bert(partial, cfg)
  res = hf.load_bert(partial, cfg, allow=("missing",))
  assert res.report.missing
  # A config that does not match the file is refused with the field named.
  with pytest.raises(ValueError, match="num_heads"):
    hf.load_bert(
      minilm,
      dataclasses.replace(
        cfg,
        text=dataclasses.replace(text, num_heads=6),
        fusion=FusionConfig(depth=1, num_heads=6, mlp_dim=1536),
      ),
    )


# ---------------------------------------------------------------------------------------------
# BEiT.
# ---------------------------------------------------------------------------------------------

VCFG = VisionConfig(width=36, depth=2, num_heads=3, mlp_dim=52, image_size=64)


def _hf_beit():
  bc = transformers.BeitConfig(
    hidden_size=VCFG.width,
    num_hidden_layers=VCFG.depth,
    num_attention_heads=VCFG.num_heads,
    intermediate_size=VCFG.mlp_dim,
    image_size=VCFG.image_size,
    patch_size=16,
    use_relative_position_bias=True,
    use_shared_relative_position_bias=False,
    use_absolute_position_embeddings=False,
    layer_scale_init_value=0.1,
    use_mean_pooling=True,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    drop_path_rate=0.1,
  )
  torch.manual_seed(0)
  ref = transformers.BeitModel(bc).eval()
  with torch.no_grad():  # every parameter non-trivial (HF inits tables/cls at 0, gammas at 0.1)
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return ref


def _official_layout(sd):
  """The same weights written in the official BEiT-2 .pth layout (as `load_pretrained_beit2`
  reads)."""
  out = {
    "cls_token": sd["embeddings.cls_token"],
    "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
    "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
    "fc_norm.weight": sd["pooler.layernorm.weight"],
    "fc_norm.bias": sd["pooler.layernorm.bias"],
    "head.weight": np.zeros((5, VCFG.width), np.float32),
    "head.bias": np.zeros(5, np.float32),
  }
  for i in range(VCFG.depth):
    h, b = f"layers.{i}.", f"blocks.{i}."
    out.update(
      {
        b + "gamma_1": sd[h + "lambda_1"],
        b + "gamma_2": sd[h + "lambda_2"],
        b + "norm1.weight": sd[h + "layernorm_before.weight"],
        b + "norm1.bias": sd[h + "layernorm_before.bias"],
        b + "norm2.weight": sd[h + "layernorm_after.weight"],
        b + "norm2.bias": sd[h + "layernorm_after.bias"],
        b + "attn.qkv.weight": np.concatenate(
          [sd[h + f"attention.{n}_proj.weight"] for n in "qkv"]
        ),
        b + "attn.q_bias": sd[h + "attention.q_proj.bias"],
        b + "attn.v_bias": sd[h + "attention.v_proj.bias"],
        b + "attn.relative_position_bias_table": sd[
          h + "relative_position_bias.relative_position_bias_table"
        ],
        b + "attn.relative_position_index": np.zeros((17, 17), np.int64),
        b + "attn.proj.weight": sd[h + "attention.o_proj.weight"],
        b + "attn.proj.bias": sd[h + "attention.o_proj.bias"],
        b + "mlp.fc1.weight": sd[h + "mlp.fc1.weight"],
        b + "mlp.fc1.bias": sd[h + "mlp.fc1.bias"],
        b + "mlp.fc2.weight": sd[h + "mlp.fc2.weight"],
        b + "mlp.fc2.bias": sd[h + "mlp.fc2.bias"],
      }
    )
  return out


def test_beit_vision_tower_matches_transformers():
  ref = _hf_beit()
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  cfg = ModelConfig.tiny(vision=VCFG)
  res = hf_beit.load_beit(sd, cfg)
  assert res.not_loaded == frozenset() and len(res.loaded) == 21
  model = host_model(cfg)
  apply.apply_params(model, res.params)

  pixels = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  ours = np.asarray(nnx.jit(lambda m, p: m.encode_image(p))(model, jnp.asarray(pixels)))
  x = (pixels.astype(np.float32) / 255.0 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
  with torch.no_grad():
    hidden = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state
    # use_mean_pooling: their final `layernorm` is the identity and `pooler.layernorm` holds the
    # weights of BEiT's fc_norm; X2-VLM applies it to each patch token, then averages
    # (docs/fidelity.md#vision-token-0-is-the-patch-mean).
    patches = torch.nn.functional.layer_norm(
      hidden[:, 1:], (VCFG.width,), ref.pooler.layernorm.weight, ref.pooler.layernorm.bias, eps=1e-6
    ).numpy()
  err_patch = float(np.max(np.abs(ours[:, 1:] - patches)))
  err_mean = float(np.max(np.abs(ours[:, 0] - patches.mean(axis=1))))
  print(
    f"BEiT vision tower vs transformers BeitModel: patch tokens max |diff| = {err_patch:.3e}, "
    f"mean token {err_mean:.3e}"
  )
  assert err_patch <= 1e-5 and err_mean <= 1e-5

  # The official .pth layout (wrapped in 'model', with head.* and index buffers) loads the same.
  off = hf_beit.load_beit({"model": _official_layout(sd)}, cfg)
  for path in res.loaded:
    a, b = treepath.flatten_dict(res.params)[path], treepath.flatten_dict(off.params)[path]
    np.testing.assert_array_equal(a, b, err_msg=path)


def test_beit_shared_table_resize_and_strictness():
  ref = _hf_beit()
  sd = _official_layout({k: v.numpy() for k, v in ref.state_dict().items()})
  shared = sd.pop("blocks.0.attn.relative_position_bias_table")
  del sd["blocks.1.attn.relative_position_bias_table"]
  sd["rel_pos_bias.relative_position_bias_table"] = shared
  cfg = ModelConfig.tiny(vision=VCFG)
  res = hf_beit.load_beit(sd, cfg)
  tables = res.params["vision"]["blocks"]["attn"]["rel_pos_bias"]
  np.testing.assert_array_equal(tables[0], shared)
  np.testing.assert_array_equal(tables[1], shared)
  # A model at 96 px (grid 6) gets the 64-px (grid 4) tables resized by the official algorithm
  # (docs/fidelity.md#relative-position-bias-resize).
  big = ModelConfig.tiny(vision=dataclasses.replace(VCFG, image_size=96))
  res96 = hf_beit.load_beit(sd, big)
  t96 = res96.params["vision"]["blocks"]["attn"]["rel_pos_bias"]
  assert t96.shape == (2, 11 * 11 + 3, 3)
  np.testing.assert_array_equal(t96[0, -3:], shared[-3:])
  assert any("resized grid 4 -> 6" in n for n in res96.report.notes)
  # Absolute position embeddings have no place in this tower: strict refusal names the key.
  with pytest.raises(C.ConversionError, match="pos_embed"):
    hf_beit.load_beit({**sd, "pos_embed": np.zeros((1, 17, 36), np.float32)}, cfg)
  with pytest.raises(C.ConversionError, match=r"qkv\.weight"):
    hf_beit.load_beit({**sd, "blocks.1.attn.qkv.weight": np.zeros((36, 36), np.float32)}, cfg)
