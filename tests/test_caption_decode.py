"""Caption decoding (x2vlm_jax/caption_decode.py) on a tiny model: beam 1 equals greedy, every
returned score is the sum of the token log-probabilities of a direct (uncached) forward pass,
EOS and length limits on hand-made cases, trigram bans, and one compile per batch shape."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from x2vlm_jax import caption_decode as cd
from x2vlm_jax import tasks_caption as tc
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.models.x2vlm import X2VLM

PROMPT = jnp.asarray([101, 7, 8, 9], jnp.int32)  # [CLS] + a 3-piece prompt
CFG = cd.DecodeConfig(num_beams=3, max_length=7, min_length=2)


@pytest.fixture(scope="module")
def setup():
  base = ModelConfig.tiny()
  cfg = base.replace(text=dataclasses.replace(base.text, vocab_size=131))
  model = X2VLM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  pixels = jnp.asarray(np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), np.uint8))

  @jax.jit
  def run(state, pixels):
    m = nnx.merge(graphdef, state)
    greedy = cd.greedy(m, pixels, PROMPT, dataclasses.replace(CFG, num_beams=1))
    beam1 = cd.beam_search(m, pixels, PROMPT, dataclasses.replace(CFG, num_beams=1))
    return greedy, beam1, cd.beam_search(m, pixels, PROMPT, CFG)

  return model, state, pixels, run


def _with_eos_bias(model, value):
  """The model's state with the MLM head's bias of [SEP] set to `value` (a hand-made EOS rate)."""
  graphdef, state = nnx.split(model)
  m = nnx.merge(graphdef, state)  # a copy: the fixture's model keeps its bias
  m.mlm_head.bias[...] = m.mlm_head.bias[...].at[CFG.eos_id].set(value)
  return nnx.split(m)[1]


@nnx.jit
def _direct(model, pixels, tokens):
  """log p of every token of tokens [B, S] from one uncached forward pass: the training layout
  with a [MASK] inserted before every token (`tasks_caption.caption_attention`). Attention is
  causal, so the tokens after a caption's end change nothing before it."""
  b, s = tokens.shape
  p = len(PROMPT)
  pairs = jnp.stack([jnp.full((b, s), CFG.mask_id), tokens], -1).reshape(b, 2 * s)
  ids = jnp.concatenate([jnp.broadcast_to(PROMPT, (b, p)), pairs], 1)
  pos = jnp.concatenate([jnp.arange(p), jnp.repeat(p + jnp.arange(s), 2)])
  ins = jnp.concatenate([jnp.zeros(p, jnp.int32), jnp.tile(jnp.asarray([1, 0]), s)])
  att = tc.caption_attention(jnp.broadcast_to(ins, (b, p + 2 * s)))
  pos = jnp.broadcast_to(pos, (b, p + 2 * s))
  fused = tc.caption_states(model, pixels, ids, pos, att)
  slots = jnp.broadcast_to(p + 2 * jnp.arange(s), (b, s))
  logp = jax.nn.log_softmax(model.mlm_logits(fused, slots), -1)  # [B, S, V]
  return jnp.take_along_axis(logp, tokens[:, :, None], -1)[:, :, 0]


def test_beam_one_equals_greedy_and_scores_are_direct_log_probs(setup):
  model, state, pixels, run = setup
  greedy, beam1, beam3 = run(state, pixels)
  np.testing.assert_array_equal(greedy.tokens, beam1.tokens)
  np.testing.assert_array_equal(greedy.lengths, beam1.lengths)
  np.testing.assert_allclose(greedy.scores, beam1.scores, rtol=1e-6)
  for out in (greedy, beam3):
    lp = np.asarray(_direct(model, pixels, out.tokens))
    for i in range(pixels.shape[0]):
      n = int(out.lengths[i])
      assert 1 <= n <= CFG.max_length
      assert np.all(np.asarray(out.tokens[i, n:]) == 0)
      np.testing.assert_allclose(float(out.scores[i]), lp[i, :n].sum(), rtol=1e-4, atol=1e-4)
  # Beam search finds a hypothesis at least as probable as greedy's when both run to the cap.
  full = (np.asarray(greedy.lengths) == CFG.max_length) & (np.asarray(beam3.lengths) == 7)
  assert np.all(np.asarray(beam3.scores)[full] >= np.asarray(greedy.scores)[full] - 1e-4)


def test_eos_min_length_and_length_cap(setup):
  model, _, pixels, run = setup
  # EOS overwhelmingly likely: every caption ends at the first step EOS is allowed.
  greedy, beam1, beam3 = run(_with_eos_bias(model, 1e3), pixels)
  for out in (greedy, beam1, beam3):
    np.testing.assert_array_equal(out.lengths, CFG.min_length + 1)
    np.testing.assert_array_equal(out.tokens[:, CFG.min_length], CFG.eos_id)
    assert not np.any(np.asarray(out.tokens[:, : CFG.min_length]) == CFG.eos_id)
  # EOS impossible: every caption runs to max_length without it.
  greedy, beam1, beam3 = run(_with_eos_bias(model, -1e3), pixels)
  for out in (greedy, beam1, beam3):
    np.testing.assert_array_equal(out.lengths, CFG.max_length)
    assert not np.any(np.asarray(out.tokens) == CFG.eos_id)
  # The three calls (three different stopping steps) compiled once.
  assert run._cache_size() == 1


def test_repeated_trigram_is_banned_and_eos_before_min_length():
  cfg = cd.DecodeConfig(min_length=3, no_repeat_ngram=3)
  seqs = jnp.asarray([[5, 6, 7, 5, 6, 0, 0], [5, 6, 7, 5, 0, 0, 0]], jnp.int32)
  logp = jnp.zeros((2, 131))
  out = np.asarray(cd.banned(logp, seqs, 5, cfg))
  assert out[0, 7] == cd.PENALTY  # "5 6" already followed by 7
  assert np.sum(out[0] != 0) == 1  # nothing else (t = 5 >= min_length: EOS allowed)
  out = np.asarray(cd.banned(logp, seqs, 4, cfg))  # row 1 after "5 6 7 5": tail "7 5", new
  assert np.all(out[1] == 0)
  out = np.asarray(cd.banned(logp, seqs, 2, cfg))
  assert np.all(out[:, cfg.eos_id] == cd.PENALTY) and np.sum(out != 0) == 2
