"""MVPTR initialised from a (tiny, random) BERT state dict: stacks from the paper's layers,
phrase rows as word means, everything else from the fresh init, unknown keys refused."""

import numpy as np
import pytest

from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import mvptr_init as MI
from x2vlm_jax.convert import mvptr_spec as S
from x2vlm_jax.models.mvptr_config import MvptrConfig

CFG = MvptrConfig.tiny()


def tiny_bert(seed=0):
  """HF BertForPreTraining layout with 2 * depth layers, random values."""
  rng = np.random.default_rng(seed)
  d, f, sd = CFG.width, CFG.mlp_dim, {}

  def add(key, *shape):
    sd[key] = rng.standard_normal(shape).astype(np.float32)

  add("bert.embeddings.word_embeddings.weight", CFG.word_vocab_size, d)
  add("bert.embeddings.position_embeddings.weight", CFG.max_positions, d)
  add("bert.embeddings.token_type_embeddings.weight", 2, d)
  sd["bert.embeddings.position_ids"] = np.arange(CFG.max_positions)[None]
  for n in ("weight", "bias"):
    add(f"bert.embeddings.LayerNorm.{n}", d)
  for i in range(2 * CFG.depth):
    b = f"bert.encoder.layer.{i}."
    for name in (
      "attention.self.query",
      "attention.self.key",
      "attention.self.value",
      "attention.output.dense",
    ):
      add(b + name + ".weight", d, d)
      add(b + name + ".bias", d)
    add(b + "intermediate.dense.weight", f, d)
    add(b + "intermediate.dense.bias", f)
    add(b + "output.dense.weight", d, f)
    add(b + "output.dense.bias", d)
    for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
      add(b + ln + ".weight", d)
      add(b + ln + ".bias", d)
  add("bert.pooler.dense.weight", d, d)
  add("bert.pooler.dense.bias", d)
  add("cls.predictions.bias", CFG.word_vocab_size)
  add("cls.predictions.transform.dense.weight", d, d)
  add("cls.predictions.transform.dense.bias", d)
  add("cls.predictions.transform.LayerNorm.weight", d)
  add("cls.predictions.transform.LayerNorm.bias", d)
  sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
  add("cls.seq_relationship.weight", 2, d)
  add("cls.seq_relationship.bias", 2)
  return sd


def fresh_init(seed=1):
  rng = np.random.default_rng(seed)
  flat = {
    k: rng.standard_normal(s).astype(np.float32) for k, (s, _) in S.mvptr_param_shapes(CFG).items()
  }
  nested = {}
  for k, v in flat.items():
    node = nested
    *head, last = k.split(".")
    for h in head:
      node = node.setdefault(h, {})
    node[last] = v
  return nested


def test_init_from_bert_follows_the_paper():
  bert, init = tiny_bert(), fresh_init()
  phrases = {70: [3, 5], 75: [7, 8, 9]}  # ids >= word_vocab_size 61
  params, report = MI.init_from_bert(bert, CFG, phrases, init)
  q = lambda stack: params[stack]["layers"]["attn"]["query"]["kernel"]  # noqa: E731
  for i in range(CFG.depth):
    w = bert[f"bert.encoder.layer.{i}.attention.self.query.weight"]
    np.testing.assert_array_equal(q("txt_encoder")[i].reshape(40, 40).T, w)
    np.testing.assert_array_equal(q("vis_encoder")[i].reshape(40, 40).T, w)
    w_mul = bert[f"bert.encoder.layer.{CFG.depth + i}.attention.self.query.weight"]
    np.testing.assert_array_equal(q("mul_encoder")[i].reshape(40, 40).T, w_mul)
  table, words = params["embeddings"]["word"], bert["bert.embeddings.word_embeddings.weight"]
  np.testing.assert_array_equal(table[:61], words)
  np.testing.assert_allclose(table[70], words[[3, 5]].mean(0), rtol=1e-6)
  np.testing.assert_allclose(table[75], words[[7, 8, 9]].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(table[71], init["embeddings"]["word"][71])  # no phrase: fresh
  np.testing.assert_array_equal(params["mlm_head"]["bias"], bert["cls.predictions.bias"])
  np.testing.assert_array_equal(params["img_embedding"]["kernel"], init["img_embedding"]["kernel"])
  assert "img_embedding.kernel" in report.missing and "tag_mlm_head.bias" in report.missing
  assert not report.unexpected and not report.check


def test_init_from_bert_refuses_bad_input():
  bert, init = tiny_bert(), fresh_init()
  with pytest.raises(ValueError, match="phrase id 10"):
    MI.init_from_bert(bert, CFG, {10: [1]}, init)
  with pytest.raises(ValueError, match="word ids"):
    MI.init_from_bert(bert, CFG, {70: [61]}, init)
  bert["bert.encoder.layer.6.output.dense.bias"] = np.zeros(40, np.float32)  # a 7th layer
  with pytest.raises(C.ConversionError, match="mul_encoder.layer.3"):
    MI.init_from_bert(bert, CFG, {}, init)
