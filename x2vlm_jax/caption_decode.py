"""Caption generation with the MLM head, left to right, as the official
`XVLMForMLMCaptioning.generate` / `beam_search` (docs/finetuning.md#caption-decoding).

Scheme: the prompt `[CLS] a picture of` is followed by one `[MASK]` at the next position; the
MLM head at that `[MASK]` gives the next token, which then takes the `[MASK]`'s place (same
position id) and a new `[MASK]` is appended after it. Attention is causal, so earlier positions
never change: their per-layer self-attention keys/values are cached (`models/incremental.py`).

Per batch, computed once: the vision tower and every fusion layer's cross-attention K/V of the
images (beams gather their image's rows, nothing is tiled), and the prompt's keys/values.
Recomputed per step, for every beam: the two newest tokens -- the token chosen at the last step
(its keys/values were not known before it was chosen) and the new `[MASK]` (whose states are
never cached: a `[MASK]` is seen by nobody else) -- through all text and fusion layers, plus the
MLM head at the `[MASK]`; and, after the beams are re-ranked, the gather of the cache rows of
each beam's parent. Everything has static shapes: `max_length` steps over a cache of
prompt + max_length slots, inside one `lax.while_loop` that stops when every image is finished,
so a batch compiles once whatever the captions' lengths.

Rules (official): `[SEP]` ends a caption (EOS) and is forbidden (log-prob -10000) at the first
`min_length` steps; a token that would repeat a trigram already in the beam gets -10000
(`no_repeat_ngram` 3; 0 switches it off); an ended beam keeps being extended with -10000 added
per step, so its children sink; beam search keeps `num_beams` beams from the top `num_beams`
tokens of each beam. The result of an image is the best of the ended hypotheses of every step
up to the first step at which all beams have ended (or of all beams at the last step), scored by
summed log-probabilities divided by ((5 + steps) / 6) ** length_penalty when length_penalty > 0
(official default 0: no normalisation). Returned scores are the summed log-probabilities (EOS
included) of the returned tokens.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from x2vlm_jax.models import incremental as inc
from x2vlm_jax.models.x2vlm import X2VLM

PENALTY = -10000.0  # the official additive ban


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """The official generation settings (coco_captioning_large: beam 3, 50, 5, 0, trigrams)."""

  num_beams: int = 3
  max_length: int = 50  # steps = generated tokens, EOS included
  min_length: int = 5  # EOS forbidden at the first min_length steps
  length_penalty: float = 0.0
  no_repeat_ngram: int = 3  # 0: allow repeats
  eos_id: int = 102  # [SEP] of the BERT vocabulary
  mask_id: int = 103  # [MASK]


class Captions(NamedTuple):
  """Generated tokens [B, max_length] (0 after the end), lengths [B] and scores [B]."""

  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array


def _prefill(model: X2VLM, kv, prompt: jax.Array, b: int, cfg: DecodeConfig):
  """The prompt + first [MASK] of b rows: (log-probs at the [MASK] [b, V], cache of the prompt)."""
  p = prompt.shape[0]
  ids = jnp.concatenate([jnp.broadcast_to(prompt, (b, p)), jnp.full((b, 1), cfg.mask_id)], 1)
  pos = jnp.broadcast_to(jnp.arange(p + 1), (b, p + 1))
  tril = jnp.tril(jnp.ones((p + 1, p + 1), jnp.int32))
  cache = inc.empty_cache(model, b, p + cfg.max_length)
  h, new = inc.extend(
    model, ids, pos, jnp.broadcast_to(tril, (b, p + 1, p + 1)), cache,
    jnp.zeros((b, p + cfg.max_length), jnp.int32), kv, jnp.arange(b),
  )  # fmt: skip
  logits = model.mlm_logits(h, jnp.full((b, 1), p))[:, 0]
  return jax.nn.log_softmax(logits, -1), inc.write(cache, new, 0, p)


def _step(split, kv, kv_index, cache, last, p: int, t, cfg: DecodeConfig):
  """Step t >= 1 for N rows: the token of step t-1 (`last` [N]) and a new [MASK] -> (log-probs
  [N, V] at the [MASK], the cache with the token's keys/values written). `split` = the model's
  (graphdef, state), the state carried through the loop: NNX refuses parameters traced at an
  outer level inside the loop's layer scan."""
  model = nnx.merge(*split)
  n = last.shape[0]
  ids = jnp.stack([last, jnp.full((n,), cfg.mask_id, last.dtype)], 1)  # [N, 2]
  pos = jnp.broadcast_to(p + t - 1 + jnp.arange(2), (n, 2))
  c = cache.text.key.shape[2]
  seen = jnp.broadcast_to(jnp.arange(c) < p + t - 1, (n, c)).astype(jnp.int32)
  tril = jnp.broadcast_to(jnp.tril(jnp.ones((2, 2), jnp.int32)), (n, 2, 2))
  h, new = inc.extend(model, ids, pos, tril, cache, seen, kv, kv_index)
  logits = model.mlm_logits(h, jnp.ones((n, 1), jnp.int32))[:, 0]
  return jax.nn.log_softmax(logits, -1), inc.write(cache, new, p + t - 1)


def banned(log_probs: jax.Array, seqs: jax.Array, t, cfg: DecodeConfig) -> jax.Array:
  """log_probs [N, V] at step t with the official bans: tokens completing a trigram that already
  occurs in the row's generated tokens seqs[:, :t] get +PENALTY, and EOS is set to PENALTY while
  t < min_length."""
  n, s = seqs.shape
  g = cfg.no_repeat_ngram
  if g > 0 and s >= g:
    idx = jnp.arange(s - g + 1)  # start of an earlier n-gram
    tail = jax.lax.dynamic_slice_in_dim(jnp.pad(seqs, ((0, 0), (g, 0))), t + 1, g - 1, axis=1)
    match = idx[None, :] + g - 1 < t  # the n-gram lies inside the first t tokens
    for j in range(g - 1):
      match = match & (seqs[:, idx + j] == tail[:, j : j + 1])
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], match.shape)
    hit = jnp.zeros(log_probs.shape, jnp.float32).at[rows, seqs[:, idx + g - 1]].max(match)
    log_probs = log_probs + hit * PENALTY
  eos = jnp.where(t < cfg.min_length, PENALTY, log_probs[:, cfg.eos_id])
  return log_probs.at[:, cfg.eos_id].set(eos)


def _encode(model: X2VLM, pixels):
  return model.vision_kv(model.encode_image(pixels))  # [layers, B, S, H, dh] each


def greedy(model: X2VLM, pixels: jax.Array, prompt: jax.Array, cfg: DecodeConfig) -> Captions:
  """The most probable token at every step (with the bans) until EOS or max_length."""
  b, s, p = pixels.shape[0], cfg.max_length, prompt.shape[0]
  kv = _encode(model, pixels)
  split = nnx.split(model)
  seqs = jnp.zeros((b, s), jnp.int32)

  def choose(logp, seqs, t):
    logp = banned(logp, seqs, t, cfg)
    tok = jnp.argmax(logp, -1).astype(jnp.int32)
    return tok, jnp.take_along_axis(logp, tok[:, None], 1)[:, 0]

  logp, cache = _prefill(model, kv, prompt, b, cfg)
  tok, score = choose(logp, seqs, 0)
  state = (1, cache, tok, seqs.at[:, 0].set(tok), score, tok == cfg.eos_id, jnp.ones(b, jnp.int32))
  state = state + (split[1],)

  def body(st):
    t, cache, last, seqs, score, done, length, params = st
    logp, cache = _step((split[0], params), kv, jnp.arange(b), cache, last, p, t, cfg)
    tok, lp = choose(logp, seqs, t)
    tok = jnp.where(done, 0, tok)
    seqs = seqs.at[:, t].set(tok)
    score = score + jnp.where(done, 0.0, lp)
    length = length + (~done).astype(jnp.int32)
    return t + 1, cache, tok, seqs, score, done | (tok == cfg.eos_id), length, params

  st = jax.lax.while_loop(lambda st: (st[0] < s) & ~jnp.all(st[5]), body, state)
  return Captions(st[3], st[6], st[4])


class _Beams(NamedTuple):
  t: jax.Array
  cache: inc.Cache
  seqs: jax.Array  # [N, S] generated tokens of every beam
  scores: jax.Array  # [B, K] cumulative (official: bans and ended-beam penalties included)
  best: tuple  # (selection score [B], raw score [B], tokens [B, S], length [B])
  stopped: jax.Array  # [B] a step at which all beams had ended has passed
  params: nnx.State  # the model's state, carried (see `_step`)


def _keep_best(st: _Beams, k_ids, k_scores, seqs, t, cfg: DecodeConfig, last_step) -> tuple:
  """Best hypothesis so far per image: ended beams of this step (all beams at the last step)."""
  b, k = k_ids.shape
  cand = ((k_ids == cfg.eos_id) | last_step) & ~st.stopped[:, None]
  sel = k_scores
  if cfg.length_penalty > 0:
    sel = sel / ((5.0 + t + 1) / 6.0) ** cfg.length_penalty
  sel = jnp.where(cand, sel, -jnp.inf)
  i = jnp.argmax(sel, -1)  # the first of equal scores, as the official scan
  val = jnp.take_along_axis(sel, i[:, None], 1)[:, 0]
  better = val > st.best[0]
  row = jnp.arange(b) * k + i
  return (
    jnp.where(better, val, st.best[0]),
    jnp.where(better, jnp.take_along_axis(k_scores, i[:, None], 1)[:, 0], st.best[1]),
    jnp.where(better[:, None], seqs[row], st.best[2]),
    jnp.where(better, t + 1, st.best[3]),
  )


def beam_search(model: X2VLM, pixels: jax.Array, prompt: jax.Array, cfg: DecodeConfig) -> Captions:
  """The official beam search (module docstring), `cfg.num_beams` beams per image."""
  b, s, p, k = pixels.shape[0], cfg.max_length, prompt.shape[0], cfg.num_beams
  kv = _encode(model, pixels)
  split = nnx.split(model)
  kv_index = jnp.repeat(jnp.arange(b), k)  # beam row -> image
  logp, cache = _prefill(model, kv, prompt, b, cfg)
  logp = banned(logp, jnp.zeros((b, s), jnp.int32), 0, cfg)
  scores, ids = jax.lax.top_k(logp, k)  # [B, K]
  seqs = jnp.zeros((b * k, s), jnp.int32).at[:, 0].set(ids.reshape(-1))
  zero = jnp.zeros(b, jnp.int32)
  none = (jnp.full(b, -jnp.inf), jnp.zeros(b), jnp.zeros((b, s), jnp.int32), zero)
  st = _Beams(jnp.int32(0), None, seqs, scores, none, jnp.zeros(b, bool), None)
  best = _keep_best(st, ids, scores, seqs, 0, cfg, s == 1)
  stopped = jnp.all(ids == cfg.eos_id, -1)
  cache = jax.tree.map(lambda a: jnp.repeat(a, k, axis=1), cache)
  st = _Beams(jnp.int32(1), cache, seqs, scores, best, stopped, split[1])

  def body(st: _Beams) -> _Beams:
    t = st.t
    last = st.seqs[jnp.arange(b * k), t - 1]
    logp, cache = _step((split[0], st.params), kv, kv_index, st.cache, last, p, t, cfg)
    logp = banned(logp, st.seqs, t, cfg)
    kk_scores, kk_ids = jax.lax.top_k(logp, k)  # [N, K]
    ended = (last == cfg.eos_id).astype(jnp.float32)[:, None]
    kk_scores = kk_scores + ended * PENALTY + st.scores.reshape(-1, 1)
    scores, idx = jax.lax.top_k(kk_scores.reshape(b, k * k), k)  # [B, K]
    parent = jnp.arange(b)[:, None] * k + idx // k  # [B, K] rows of N
    ids = jnp.take_along_axis(kk_ids.reshape(b, k * k), idx, 1)
    seqs = st.seqs[parent.reshape(-1)].at[:, t].set(ids.reshape(-1))
    best = _keep_best(st, ids, scores, seqs, t, cfg, t == s - 1)
    stopped = st.stopped | jnp.all(ids == cfg.eos_id, -1)
    cache = inc.reorder(cache, parent.reshape(-1))
    return _Beams(t + 1, cache, seqs, scores, best, stopped, st.params)

  st = jax.lax.while_loop(lambda st: (st.t < s) & ~jnp.all(st.stopped), body, st)
  _, raw, tokens, lengths = st.best
  keep = jnp.arange(s)[None, :] < lengths[:, None]
  return Captions(jnp.where(keep, tokens, 0), lengths, raw)


def generate(model: X2VLM, pixels: jax.Array, prompt: jax.Array, cfg: DecodeConfig) -> Captions:
  """Greedy when num_beams == 1, else beam search (both official with one beam)."""
  if cfg.num_beams < 1 or cfg.max_length < 1:
    raise ValueError(f"num_beams and max_length must be >= 1, got {cfg}")
  if cfg.num_beams == 1:
    return greedy(model, pixels, prompt, cfg)
  return beam_search(model, pixels, prompt, cfg)
