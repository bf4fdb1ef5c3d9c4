"""Official MVPTR state dict <-> ours: every key and shape of the spec at tiny and base size,
bit-exact round trip, the tied word-row decoders, strict errors that name the key."""

import numpy as np
import pytest
from flax import nnx

from x2vlm_jax import sharding, treepath
from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import mvptr as MC
from x2vlm_jax.convert import mvptr_spec as S
from x2vlm_jax.models.mvptr import abstract_mvptr, count_mvptr_params
from x2vlm_jax.models.mvptr_config import MvptrConfig

TINY = MvptrConfig.tiny(qa_answers=3)


def random_official(cfg: MvptrConfig, seed: int = 0):
  """A random official-format state dict with the decoders tied as the official model ties them."""
  rng = np.random.default_rng(seed)
  sd = {
    k: rng.standard_normal(s).astype(np.float32) for k, (s, _) in S.mvptr_state_spec(cfg).items()
  }
  for key in S.tied_keys(cfg):
    sd[key] = sd["bert.embeddings.word_embeddings.weight"][: cfg.word_vocab_size].copy()
  return sd


def _model_shapes(cfg):
  state = nnx.to_pure_dict(nnx.state(abstract_mvptr(cfg), nnx.Param))
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in treepath.flatten_dict(state).items()}


@pytest.mark.parametrize(
  "cfg",
  [TINY, MvptrConfig.tiny(phrase_head=True), MvptrConfig.base()],
  ids=["tiny", "tiny_phrase_head", "base"],
)
def test_spec_and_shapes_match_the_model(cfg):
  assert S.mvptr_param_shapes(cfg) == _model_shapes(cfg)
  spec = S.mvptr_state_spec(cfg)
  head = cfg.phrase_head * (cfg.vocab_size + cfg.width * (cfg.width + 3))  # not official
  assert S.count_parameters(spec) + head == count_mvptr_params(cfg)
  # Every official key has a rule whose target exists with the transformed shape.
  ours, rules = S.mvptr_param_shapes(cfg), MC.mvptr_rules(cfg)
  for key, (shape, _) in spec.items():
    rule, m = C.find_rule(rules, key)
    path, idx = rule.resolve(m)
    target = ours[path][0] if idx is None else ours[path][0][1:]
    assert tuple(rule.transform.foreign_shape(target)) == shape, key


def test_base_key_list():
  spec = S.mvptr_state_spec(MvptrConfig.base())
  assert len(spec) == 1 + 2 + 5 + 3 * 6 * 16 + 2 + 2 + 2 * 6 + 2 == 314
  assert spec["bert.embeddings.word_embeddings.weight"][0] == (86051, 768)
  assert spec["cls.predictions.decoder.weight"][0] == (30522, 768)
  assert spec["bert.img_embedding.weight"][0] == (768, 2054)
  assert S.count_parameters(spec) == 198660471


def test_round_trip_is_bit_exact_and_strict():
  sd = random_official(TINY)
  params, report = MC.mvptr_to_params(sd, TINY)
  assert report.ok() and not report.missing and not report.unexpected
  assert len(report.matched) == len(sd)
  back = MC.params_to_mvptr(params, TINY)
  assert list(back) == list(sd)  # official order
  for k in sd:
    assert back[k].dtype == np.float32 and np.array_equal(back[k], sd[k]), k
  # Layout spot checks: heads split from PyTorch (out, in) rows, stacks not swapped.
  q = params["vis_encoder"]["layers"]["attn"]["query"]["kernel"][2]  # [D, H, dh]
  np.testing.assert_array_equal(
    q.reshape(40, 40).T, sd["bert.vis_encoder.layer.2.attention.self.query.weight"]
  )
  np.testing.assert_array_equal(params["txt_proj"], sd["bert.txt_proj"])
  np.testing.assert_array_equal(
    params["img_embedding"]["kernel"], sd["bert.img_embedding.weight"].T
  )


def test_untied_decoder_and_missing_key_are_named():
  sd = random_official(TINY)
  sd["half_mlm.decoder.weight"] = sd["half_mlm.decoder.weight"] + 1.0
  with pytest.raises(C.ConversionError, match="half_mlm.decoder.weight: tied"):
    MC.mvptr_to_params(sd, TINY)
  _, report = MC.mvptr_to_params(sd, TINY, allow=["check"])
  assert len(report.check) == 1
  del sd["bert.mul_encoder.layer.1.output.dense.bias"]
  sd["bert.extra"] = np.zeros(3, np.float32)
  with pytest.raises(C.ConversionError) as err:
    MC.mvptr_to_params(sd, TINY, allow=["check"])
  assert "mul_encoder.layers.mlp.fc2.bias[1]" in str(err.value) and "bert.extra" in str(err.value)


def test_paper_phrase_head_is_ours_only():
  cfg = MvptrConfig.tiny(phrase_head=True)
  sd = random_official(cfg)
  with pytest.raises(C.ConversionError, match="phrase_mlm_head"):
    MC.mvptr_to_params(sd, cfg)
  params, report = MC.mvptr_to_params(sd, cfg, allow=["missing"])
  assert sorted(report.missing) == [
    f"phrase_mlm_head.{n}"
    for n in ("bias", "dense.bias", "dense.kernel", "norm.bias", "norm.scale")
  ]
  params["phrase_mlm_head"] = {"bias": np.zeros(cfg.vocab_size, np.float32)}  # export drops it
  back = MC.params_to_mvptr(params, cfg)
  assert all(np.array_equal(back[k], sd[k]) for k in sd)


FINETUNE = {
  "retrieval": ["logit_scale", "classifier.weight", "classifier.bias"],
  "vqa": [f"cls.predictions.{n}" for n in ("bias", "decoder.weight", "transform.dense.weight")],
  "ve": ["classifier.weight", "classifier.bias"],
  "grounding": ["classifier.weight", "classifier.bias"],
}


@pytest.mark.parametrize("heads", sorted(FINETUNE))
def test_finetuning_heads_convert_bit_exact(heads):
  cfg = MvptrConfig.tiny(heads=heads, qa_answers=5 if heads == "vqa" else 0)
  spec = S.mvptr_state_spec(cfg)
  assert S.mvptr_param_shapes(cfg) == _model_shapes(cfg)
  assert S.count_parameters(spec, S.tied_keys(cfg)) == count_mvptr_params(cfg)
  assert sharding.check_rules_cover(nnx.state(abstract_mvptr(cfg), nnx.Param)) == []
  assert all(k in spec for k in FINETUNE[heads])
  # Only `bert.*` and the class's own heads: no pre-training head survives.
  assert not [k for k in spec if k.startswith(("half_mlm", "qa_head", "cls.seq_relationship"))]
  assert ("logit_scale" in spec) == (heads == "retrieval")
  if heads != "vqa":
    assert spec["classifier.weight"][0] == ({"retrieval": 2, "ve": 3, "grounding": 1}[heads], 40)
  else:
    assert spec["cls.predictions.decoder.weight"][0] == (5, 40)  # untied: its own matrix
  sd = random_official(cfg, seed=3)
  params, report = MC.mvptr_to_params(sd, cfg)
  assert report.ok() and not report.missing and not report.unexpected
  back = MC.params_to_mvptr(params, cfg)
  assert list(back) == list(sd)
  assert all(np.array_equal(back[k], sd[k]) for k in sd)
  if heads == "vqa":
    np.testing.assert_array_equal(
      params["vqa_head"]["decoder"], sd["cls.predictions.decoder.weight"]
    )
  else:
    np.testing.assert_array_equal(params["classifier"]["kernel"], sd["classifier.weight"].T)


def test_pretrained_file_into_a_finetuning_model_names_the_heads():
  """A pre-training file does not fit a retrieval model strictly: the report names the MLM
  heads as unexpected and the new classifier as missing (the init path allows both)."""
  cfg = MvptrConfig.tiny(heads="retrieval")
  sd = random_official(MvptrConfig.tiny())
  with pytest.raises(C.ConversionError, match="classifier"):
    MC.mvptr_to_params(sd, cfg)
  params, report = MC.mvptr_to_params(sd, cfg, allow=["missing", "unexpected"])
  assert sorted(report.missing) == ["classifier.bias", "classifier.kernel"]
  assert "half_mlm.decoder.weight" in report.unexpected
  np.testing.assert_array_equal(params["logit_scale"], sd["logit_scale"])
