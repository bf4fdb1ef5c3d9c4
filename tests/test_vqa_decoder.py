"""The VQA answer decoder against a direct NumPy computation (causal self-attention, cross-
attention to the question states, its own tied LM head), the official answer ranking against
scoring every answer separately, and the fine-tuning heads' shapes for the base model
(docs/finetuning.md#vqa-v2)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from x2vlm_jax import tasks_vqa, treepath
from x2vlm_jax.convert import official as O
from x2vlm_jax.convert import official_spec as S
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.models.decoder import answer_log_probs
from x2vlm_jax.models.x2vlm import X2VLM, abstract_model

CFG = ModelConfig.tiny(decoder_layers=2)
CFG = CFG.replace(text=dataclasses.replace(CFG.text, vocab_size=50))


@pytest.fixture(scope="module")
def model():
  return X2VLM(CFG, rngs=nnx.Rngs(params=jax.random.key(3)))


def _erf(x):
  return np.vectorize(math.erf)(x)


def _ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1 + _erf(x / np.sqrt(2)))


def _attn(x, y, p, bias):
  """BERT attention of x [L, D] over y [S, D'] with an additive bias [L, S] -> [L, D]."""
  q = np.einsum("ld,dhk->hlk", x, p["query"]["kernel"]) + p["query"]["bias"][:, None]
  k = np.einsum("sd,dhk->hsk", y, p["key"]["kernel"]) + p["key"]["bias"][:, None]
  v = np.einsum("sd,dhk->hsk", y, p["value"]["kernel"]) + p["value"]["bias"][:, None]
  logits = np.einsum("hlk,hsk->hls", q, k) / np.sqrt(q.shape[-1]) + bias[None]
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  ctx = np.einsum("hls,hsk->lhk", w, v)
  return np.einsum("lhk,hkd->ld", ctx, p["out"]["kernel"]) + p["out"]["bias"]


def numpy_decoder(params, ids, mask, question, qmask):
  """Logits [La, V] of ONE answer, written out from the BERT LM-head decoder's definition."""
  dec, eps = params["text_decoder"], CFG.text.ln_eps
  e = dec["embeddings"]
  x = e["word"][ids] + e["position"][: len(ids)] + e["token_type"][0]
  x = _ln(x, e["norm"], eps)
  la = len(ids)
  keep = np.tril(np.ones((la, la))) * mask[None, :]  # query i sees real keys j <= i
  self_bias = (1 - keep) * -10000.0
  cross_bias = np.broadcast_to((1 - qmask[None, :]) * -1e9, (la, len(qmask)))
  for i in range(CFG.decoder_layers):
    lp = jax.tree.map(lambda a, i=i: a[i], dec["layers"])
    x = _ln(x + _attn(x, x, lp["self_attn"], self_bias), lp["self_norm"], eps)
    x = _ln(x + _attn(x, question, lp["cross_attn"], cross_bias), lp["cross_norm"], eps)
    h = _gelu(x @ lp["mlp"]["fc1"]["kernel"] + lp["mlp"]["fc1"]["bias"])
    x = _ln(x + h @ lp["mlp"]["fc2"]["kernel"] + lp["mlp"]["fc2"]["bias"], lp["mlp_norm"], eps)
  head = dec["mlm_head"]
  h = _ln(_gelu(x @ head["dense"]["kernel"] + head["dense"]["bias"]), head["norm"], eps)
  return h @ e["word"].T + head["bias"]


def _case(seed=0):
  rng = np.random.default_rng(seed)
  question = rng.standard_normal((3, 7, CFG.text.width)).astype(np.float32)
  qmask = np.array([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], np.int32)
  # Answers `[CLS] a.. [SEP]` with padding, ids from a 50-word vocabulary ([CLS] 1, [SEP] 2).
  ids = np.array([[1, 7, 9, 2, 0], [1, 11, 2, 0, 0], [1, 4, 5, 6, 2], [1, 2, 0, 0, 0]], np.int32)
  return question, qmask, ids, (ids > 0).astype(np.int32)


def test_decoder_matches_direct_numpy(model):
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  question, qmask, ids, mask = _case()
  q_index = np.array([0, 1, 2, 1])
  got = np.asarray(model.answer_logits(ids, mask, question, qmask[q_index], q_index))
  for r in range(len(ids)):
    want = numpy_decoder(params, ids[r], mask[r], question[q_index[r]], qmask[q_index[r]])
    n = int(mask[r].sum())  # padded positions are never read (their labels are ignored)
    np.testing.assert_allclose(got[r, :n], want[:n], rtol=2e-4, atol=2e-4)


def test_causal_and_padding(model):
  question, qmask, ids, mask = _case(1)
  rows = np.array([0, 0, 1, 2])
  base = np.asarray(model.answer_logits(ids, mask, question, qmask[rows], rows))
  later = ids.copy()
  later[:, 3] = 13  # a different token at position 3
  changed = np.asarray(model.answer_logits(later, mask, question, qmask[rows], rows))
  np.testing.assert_array_equal(base[:, :3], changed[:, :3])  # earlier positions never see it
  assert np.abs(base[:, 3] - changed[:, 3]).max() > 1e-4
  # Masked question positions do not matter: change them, nothing moves.
  noisy = question.copy()
  noisy[1, 5:] += 100.0
  a = np.asarray(
    model.answer_logits(ids, mask, question, qmask[[0, 1, 2, 1]], np.array([0, 1, 2, 1]))
  )
  b = np.asarray(model.answer_logits(ids, mask, noisy, qmask[[0, 1, 2, 1]], np.array([0, 1, 2, 1])))
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_answer_log_probs_by_hand():
  logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3] * 3]], np.float32))
  ids, mask = np.array([[0, 0, 1]]), np.array([[1, 1, 1]])
  got = np.asarray(answer_log_probs(jnp.asarray(logits), ids, mask))
  np.testing.assert_allclose(got, np.log([[0.5, 0.8]]), rtol=1e-6)
  got = np.asarray(answer_log_probs(jnp.asarray(logits), ids, np.array([[1, 1, 0]])))
  np.testing.assert_allclose(got, np.log([[0.5, 1.0]]), rtol=1e-6)  # [PAD] target ignored


def test_ranking_equals_scoring_each_answer_alone(model):
  question, qmask, ids, mask = _case(2)
  graphdef, state = nnx.split(model)

  @jax.jit
  def alone(state, ids, mask, q, qm):  # ONE answer [1, La] for ONE question [1, Lq, Dt]
    m = nnx.merge(graphdef, state)
    start = m.answer_logits(ids[:, :1], jnp.ones((1, 1), jnp.int32), q, qm)
    p_first = jax.nn.softmax(start[0, 0])[ids[0, 1]]
    # log p(first token) + the teacher-forced sum (first token again, [SEP] included).
    return jnp.log(p_first) + answer_log_probs(m.answer_logits(ids, mask, q, qm), ids, mask).sum()

  rank = jax.jit(
    lambda state, k: tasks_vqa.rank_answers(
      nnx.merge(graphdef, state), question, qmask, ids, mask, k
    ),
    static_argnums=1,
  )
  top, probs = (np.asarray(x) for x in rank(state, len(ids)))
  for qi in range(len(question)):
    q, qm = question[qi : qi + 1], qmask[qi : qi + 1]
    scores = np.asarray(
      [float(alone(state, ids[a : a + 1], mask[a : a + 1], q, qm)) for a in range(len(ids))]
    )
    assert list(top[qi]) == list(np.argsort(-scores, kind="stable")), (qi, scores)
    np.testing.assert_allclose(probs[qi], np.sort(jax.nn.softmax(scores))[::-1], rtol=1e-4)
  # With k < the list, the candidates are the k best first tokens, re-ranked.
  assert np.asarray(rank(state, 2)[0]).shape == (3, 2)


def _shapes(cfg):
  return {p: s for p, (s, _) in treepath.flatten_dict(O.param_shapes(cfg)).items()}


def test_base_head_shapes_as_official():
  nlvr = _shapes(ModelConfig.base(cls_labels=2, cls_inputs=2))
  assert nlvr["cls_head.fc1.kernel"] == (1536, 3072) and nlvr["cls_head.fc2.kernel"] == (3072, 2)
  qa = _shapes(ModelConfig.base(cls_labels=1500))
  assert qa["cls_head.fc1.kernel"] == (768, 1536) and qa["cls_head.fc2.kernel"] == (1536, 1500)
  vqa = ModelConfig.base(decoder_layers=6)
  shapes = _shapes(vqa)
  assert shapes["text_decoder.layers.cross_attn.key.kernel"] == (6, 768, 12, 64)
  assert shapes["text_decoder.embeddings.word"] == (30522, 768)
  spec = S.official_state_spec(vqa, S.FINETUNE)
  assert spec["text_decoder.bert.encoder.layer.5.crossattention.self.key.weight"][0] == (768, 768)
  assert "text_decoder.bert.encoder.layer.6.output.dense.weight" not in spec
  assert spec["text_decoder.cls.predictions.decoder.weight"][0] == (30522, 768)
  nl_spec = S.official_state_spec(ModelConfig.base(cls_labels=2, cls_inputs=2), S.FINETUNE)
  assert nl_spec["cls_head.0.weight"][0] == (3072, 1536) and nl_spec["cls_head.3.weight"][0] == (
    2,
    3072,
  )


@pytest.mark.parametrize("cfg", [CFG, ModelConfig.tiny(cls_labels=5, cls_inputs=2)])
def test_param_table_matches_the_model_with_heads(cfg):
  state = nnx.state(abstract_model(cfg), nnx.Param)
  got = {p: tuple(v.shape) for p, v in treepath.flatten_state(state).items()}
  assert got == _shapes(cfg)
  # The heads come last: the other parameters draw the same initial values with or without them.
  plain = X2VLM(ModelConfig.tiny(), rngs=nnx.Rngs(params=jax.random.key(0)))
  with_heads = X2VLM(
    cfg.replace(text=ModelConfig.tiny().text), rngs=nnx.Rngs(params=jax.random.key(0))
  )
  a = treepath.flatten_state(nnx.state(plain, nnx.Param))
  b = treepath.flatten_state(nnx.state(with_heads, nnx.Param))
  for p in ("vision.patch_embed.kernel", "fusion.layers.mlp.fc2.kernel", "box_head.fc2.bias"):
    np.testing.assert_array_equal(np.asarray(a[p][...]), np.asarray(b[p][...]))
