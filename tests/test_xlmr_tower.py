"""XLM-R text tower (docs/multilingual.md): parity with transformers' PyTorch XLMRobertaModel
through our importer, with padding in the batch, and the official sizes of the multilingual
base / large models counted from shapes (no download)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from x2vlm_jax.convert import apply, hf_xlmr
from x2vlm_jax.convert import common as C
from x2vlm_jax.models import ModelConfig, abstract_model, count_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_config(text):
  return transformers.XLMRobertaConfig(
    vocab_size=text.vocab_size,
    hidden_size=text.width,
    num_hidden_layers=text.depth,
    num_attention_heads=text.num_heads,
    intermediate_size=text.mlp_dim,
    max_position_embeddings=text.max_positions,
    type_vocab_size=1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
  )


def _host_model(cfg, seed=0):
  graphdef, state = nnx.split(abstract_model(cfg))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def pair():
  cfg = ModelConfig.xlmr_tiny()
  torch.manual_seed(0)
  theirs = transformers.XLMRobertaModel(_hf_config(cfg.text), add_pooling_layer=True).eval()
  with torch.no_grad():  # non-trivial LayerNorms so a swapped scale/bias cannot hide
    for name, p in theirs.named_parameters():
      if "LayerNorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  sd = {k: v.numpy() for k, v in theirs.state_dict().items()}
  res = hf_xlmr.load_xlmr(sd, cfg)
  ours = _host_model(cfg)
  apply.apply_params(ours, res.params)
  return cfg, theirs, ours, res


def test_xlmr_tower_matches_transformers_with_padding(pair):
  cfg, theirs, ours, res = pair
  assert not [p for p in res.not_loaded if p.startswith("text.")]
  assert any("pooler" in n for n in res.report.notes)
  rng = np.random.default_rng(1)
  lengths = [12, 7, 3, 12]
  ids = np.full((4, 12), 1, np.int64)  # XLM-R pads with id 1
  mask = np.zeros((4, 12), np.int64)
  for i, n in enumerate(lengths):
    ids[i, :n] = np.concatenate([[0], rng.integers(3, cfg.text.vocab_size, n - 2), [2]])
    mask[i, :n] = 1
  with torch.no_grad():
    want = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  want = want.last_hidden_state.numpy()
  got = np.asarray(ours.encode_text(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # padded rows included
  # Our batches pad with id 0 (XLM-R's <s>): positions and padded ids come from the mask, so
  # the result is the same, padded rows too.
  ids0 = np.where(mask > 0, ids, 0)
  got0 = np.asarray(ours.encode_text(jnp.asarray(ids0, jnp.int32), jnp.asarray(mask, jnp.int32)))
  np.testing.assert_allclose(got0, want, atol=1e-5, rtol=0)


def test_load_xlmr_is_strict(pair):
  cfg, theirs, _, _ = pair
  sd = {"roberta." + k: v.numpy() for k, v in theirs.state_dict().items()}
  hf_xlmr.load_xlmr(sd, cfg)  # the ForMaskedLM prefix is accepted
  del sd["roberta.encoder.layer.1.output.dense.bias"]
  with pytest.raises(C.ConversionError, match="layer.1.output.dense.bias|mlp.fc2.bias"):
    hf_xlmr.load_xlmr(sd, cfg)
  with pytest.raises(ValueError, match="XLM-R text tower"):
    hf_xlmr.load_xlmr(sd, ModelConfig.tiny())


@pytest.mark.parametrize("size", ["base", "large"])
def test_xlmr_sizes_match_transformers_and_official(size):
  """Text tower = HF XLMRobertaModel without pooler (built on the meta device, shapes only);
  the whole multilingual model = the parameter counts stated in config.py."""
  cfg = getattr(ModelConfig, f"xlmr_{size}")()
  with torch.device("meta"):
    theirs = transformers.XLMRobertaModel(_hf_config(cfg.text), add_pooling_layer=False)
  want_text = sum(p.numel() for p in theirs.parameters())
  assert want_text == {"base": 277_453_056, "large": 558_840_832}[size]
  shapes = apply.expected_shapes(cfg)
  ours_text = sum(int(np.prod(s)) for p, (s, _) in shapes.items() if p.startswith("text."))
  assert ours_text == want_text
  total = {"base": 615_540_825, "large": 1_225_073_817}[size]
  assert count_params(cfg) == total


def test_xlmr_config_errors():
  with pytest.raises(ValueError, match="kind"):
    dataclasses.replace(ModelConfig.xlmr_tiny().text, kind="gpt")
  cfg = ModelConfig.xlmr_tiny()
  model = _host_model(cfg)
  ids = jnp.zeros((1, cfg.text.max_positions - 1), jnp.int32)
  with pytest.raises(ValueError, match="exceeds"):
    model.encode_text(ids, jnp.ones_like(ids))


def test_xlmr_config_from_hf_directory(tmp_path):
  cfg = ModelConfig.xlmr_tiny()
  _hf_config(cfg.text).save_pretrained(tmp_path)
  assert hf_xlmr.xlmr_config_from_hf(tmp_path) == cfg.text
  from x2vlm_jax.convert import hf

  assert hf.text_config_from_hf(tmp_path).kind == "xlmr"  # by model_type "xlm-roberta"
