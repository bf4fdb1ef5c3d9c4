"""The official BERT drop path of the text and fusion towers (docs/fidelity.md#text-drop-path):
one Bernoulli per token position shared by the whole batch on every sub-layer output, per-layer
rates linspace(0, rate, depth), hidden dropout off while it is on, nothing traced at rate 0.

The towers are checked against float64 NumPy with every random mask re-drawn from the towers'
keys, so the placement of each mask (and the absence of hidden dropout) is checked by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model_features import host_model, np_ln, np_mlp, p

from x2vlm_jax.models import ModelConfig, abstract_model
from x2vlm_jax.models import layers as L

TINY = ModelConfig.tiny()  # 2 text and 2 fusion layers: rates [0, rate]
B, LEN, S = 3, 7, 5


def config(text_rate=0.0, fusion_rate=0.0, dropout=0.1) -> ModelConfig:
  return TINY.replace(
    text=dataclasses.replace(TINY.text, drop_path_rate=text_rate, dropout=dropout),
    fusion=dataclasses.replace(TINY.fusion, drop_path_rate=fusion_rate, dropout=dropout),
  )


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  return dict(
    ids=jnp.asarray(rng.integers(1, 1000, (B, LEN)), jnp.int32),
    mask=jnp.asarray([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], jnp.int32),
    vision=jnp.asarray(0.5 * rng.standard_normal((B, S, TINY.vision.width)), jnp.float32),
    vmask=jnp.asarray([[1] * 5, [1] * 3 + [0] * 2, [1] * 5], jnp.int32),
  )


def forward(m, x, key):
  """(text states, fused states), every tower with `key` (None: deterministic)."""
  k_text, k_fuse = (None, None) if key is None else jax.random.split(key)
  text = m.encode_text(x["ids"], x["mask"], k_text)
  return text, m.fuse(text, x["mask"], x["vision"], x["vmask"], key=k_fuse)


# ---------------------------------------------------------------------------------------------
# NumPy towers with the masks drawn from the towers' keys.
# ---------------------------------------------------------------------------------------------


def mask(key, keep, shape):
  """The tower's Bernoulli(keep) draw for `key`, as float64 scaled by 1/keep."""
  return np.asarray(jax.random.bernoulli(key, keep, shape), np.float64) / np.float64(keep)


class Masks:
  """Draws the random masks of one tower pass; `branch` records the drop-path masks."""

  def __init__(self, dropout, rates):
    self.keep, self.rates, self.paths = 1.0 - dropout, rates, []

  def probs(self, key, shape):
    return mask(key, self.keep, shape)

  def branch(self, key, layer, shape):
    if self.rates is None:  # no drop path: hidden dropout on the whole [B, L, D] output
      return mask(key, self.keep, shape)
    m = mask(key, jnp.float32(1.0) - self.rates[layer], (1, shape[1], 1))
    self.paths.append((layer, m))
    return m


def np_attention(xq, xkv, attn, i, key_mask, mask_value, probs_mask):
  q = np.einsum("bld,dhk->blhk", xq, p(attn.query.kernel)[i]) + p(attn.query.bias)[i]
  k = np.einsum("bsd,dhk->bshk", xkv, p(attn.key.kernel)[i]) + p(attn.key.bias)[i]
  v = np.einsum("bsd,dhk->bshk", xkv, p(attn.value.kernel)[i]) + p(attn.value.bias)[i]
  scores = np.einsum("blhk,bshk->bhls", q, k) / np.sqrt(q.shape[-1])
  scores = scores + ((1.0 - key_mask) * mask_value)[:, None, None, :]
  w = np.exp(scores - scores.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True) * probs_mask
  ctx = np.einsum("bhls,bshk->blhk", w, v)
  return np.einsum("blhk,hkd->bld", ctx, p(attn.out.kernel)[i]) + p(attn.out.bias)[i]


def np_text(m, cfg, x, key, masks):
  k_emb, k_layers = jax.random.split(key)
  keys = L.layer_keys(k_layers, cfg.text.depth, 3)
  e, lay = m.text.embeddings, m.text.layers
  ids, tmask = np.asarray(x["ids"]), np.asarray(x["mask"], np.float64)
  h = p(e.word)[ids] + p(e.position)[:LEN][None] + p(e.token_type)[0]
  h = np_ln(h, e.norm)
  h = h * masks.probs(k_emb, h.shape)  # embedding dropout stays on
  probs = (B, TINY.text.num_heads, LEN, LEN)
  for i in range(cfg.text.depth):
    ks = keys[i]
    a = np_attention(h, h, lay.attn, i, tmask, -10000.0, masks.probs(ks[0], probs))
    h = np_ln(h + a * masks.branch(ks[1], i, h.shape), lay.attn_norm, i)
    h = np_ln(h + np_mlp(h, lay.mlp, i) * masks.branch(ks[2], i, h.shape), lay.mlp_norm, i)
  return h


def np_fuse(m, cfg, x, text, key, masks):
  keys = L.layer_keys(key, cfg.fusion.depth, 5)
  lay, vision = m.fusion.layers, p(x["vision"])
  tmask, vmask = np.asarray(x["mask"], np.float64), np.asarray(x["vmask"], np.float64)
  h, heads = text, TINY.fusion.num_heads
  for i in range(cfg.fusion.depth):
    ks = keys[i]
    a = np_attention(
      h, h, lay.self_attn, i, tmask, -10000.0, masks.probs(ks[0], (B, heads, LEN, LEN))
    )
    h = np_ln(h + a * masks.branch(ks[1], i, h.shape), lay.self_norm, i)
    c = np_attention(
      h, vision, lay.cross_attn, i, vmask, -1e9, masks.probs(ks[2], (B, heads, LEN, S))
    )
    h = np_ln(h + c * masks.branch(ks[3], i, h.shape), lay.cross_norm, i)
    h = np_ln(h + np_mlp(h, lay.mlp, i) * masks.branch(ks[4], i, h.shape), lay.mlp_norm, i)
  return h


def hand_checked(m, cfg, x, key, text_rates, fusion_rates):
  """(text, fused) by NumPy and the drop-path masks drawn for each tower."""
  k_text, k_fuse = jax.random.split(key)
  tm, fm = Masks(cfg.text.dropout, text_rates), Masks(cfg.fusion.dropout, fusion_rates)
  text = np_text(m, cfg, x, k_text, tm)
  return text, np_fuse(m, cfg, x, text, k_fuse, fm), tm.paths, fm.paths


# ---------------------------------------------------------------------------------------------
# The mask and the rates.
# ---------------------------------------------------------------------------------------------


def test_drop_positions_drops_token_positions_for_the_whole_batch():
  x = jnp.ones((4, 3000, 3))
  y = np.asarray(L.drop_positions(x, 0.25, jax.random.key(0)))
  kept = y[0, :, 0] != 0
  assert np.all(y == y[:1, :, :1])  # one value per position: every row and channel alike
  assert abs(kept.mean() - 0.75) < 0.03
  assert np.all(y[:, kept] == pytest.approx(1 / 0.75)) and np.all(y[:, ~kept] == 0)
  traced = jax.jit(lambda r: L.drop_positions(x, r, jax.random.key(0)))(0.25)
  np.testing.assert_array_equal(np.asarray(traced), y)  # the rate may be a traced scan input
  x = jax.random.normal(jax.random.key(1), (2, 5, 3))
  for k in range(20):  # rate 0 (layer 0) never drops or rescales
    np.testing.assert_array_equal(np.asarray(L.drop_positions(x, 0.0, jax.random.key(k))), x)
  np.testing.assert_array_equal(np.asarray(L.drop_positions(x, 0.25, None)), x)
  keys = jax.random.split(jax.random.key(2), 4000)
  mean = jax.vmap(lambda k: L.drop_positions(x, 0.25, k))(keys).mean(0)
  np.testing.assert_allclose(np.asarray(mean), np.asarray(x), atol=0.05)  # E[drop(x)] = x


def test_path_rates_are_the_official_linspace():
  np.testing.assert_array_equal(L.path_rates(0.1, 12), np.linspace(0, 0.1, 12).astype(np.float32))
  np.testing.assert_array_equal(L.path_rates(0.1, 6), np.linspace(0, 0.1, 6).astype(np.float32))
  assert L.path_rates(0.1, 12)[0] == 0.0 and L.path_rates(0.1, 12).dtype == np.float32
  # rates up to 1e-3 build no drop path in the official layers
  expected = np.linspace(0, 0.011, 12)
  np.testing.assert_array_equal(
    L.path_rates(0.011, 12), np.where(expected > 1e-3, expected, 0).astype(np.float32)
  )
  assert L.path_rates(0.011, 12)[1] == 0.0 and L.path_rates(0.011, 12)[2] > 0.0
  with pytest.raises(ValueError, match="TextConfig.drop_path_rate"):
    abstract_model(config(text_rate=1.0))
  with pytest.raises(ValueError, match="FusionConfig.drop_path_rate"):
    abstract_model(config(fusion_rate=-0.1))


# ---------------------------------------------------------------------------------------------
# The towers.
# ---------------------------------------------------------------------------------------------


def test_rate_zero_traces_no_drop_path(monkeypatch, inputs):
  """Rate 0 (the default) never reaches the drop-path code, and its dropout is BERT's."""

  def absent(*args):
    raise AssertionError("drop path traced at rate 0")

  monkeypatch.setattr(L, "drop_positions", absent)
  monkeypatch.setattr(L, "path_rates", absent)
  cfg = config()
  m, key = host_model(cfg), jax.random.key(5)
  text, fused = nnx.jit(forward)(m, inputs, key)
  ref_text, ref_fused, paths, _ = hand_checked(m, cfg, inputs, key, None, None)
  assert not paths
  assert np.max(np.abs(np.asarray(text) - ref_text)) < 1e-4
  assert np.max(np.abs(np.asarray(fused) - ref_fused)) < 1e-4


@pytest.mark.parametrize("text_rate,fusion_rate", [(0.5, 0.0), (0.0, 0.5), (0.5, 0.4)])
def test_drop_path_matches_hand_computed_masks(inputs, text_rate, fusion_rate):
  """Attention-probability and embedding dropout stay on, hidden dropout is off in a tower with a
  drop path, and its masks are [1, L, 1] on every branch before the residual add."""
  cfg = config(text_rate, fusion_rate)
  m, key = host_model(cfg), jax.random.key(7)
  text, fused = nnx.jit(forward)(m, inputs, key)
  rates = lambda r, d: L.path_rates(r, d) if r > 0 else None
  ref_text, ref_fused, t_paths, f_paths = hand_checked(
    m, cfg, inputs, key, rates(text_rate, 2), rates(fusion_rate, 2)
  )
  assert np.max(np.abs(np.asarray(text) - ref_text)) < 1e-4
  assert np.max(np.abs(np.asarray(fused) - ref_fused)) < 1e-4
  for paths in (t_paths, f_paths):
    for layer, m_ in paths:
      assert m_.shape == (1, LEN, 1)  # one draw per position, shared by the batch
      if layer == 0:
        assert np.all(m_ == 1.0)  # rate linspace(0, r, depth)[0] = 0: never drops
    last = [m_ for layer, m_ in paths if layer == 1]
    if last:  # the case is meaningful: the last layer drops some positions and keeps others
      assert np.any(np.concatenate(last) == 0) and np.any(np.concatenate(last) > 1)


def test_batch_rows_drop_the_same_positions(inputs):
  """Identical rows stay identical under the drop path (a per-sample mask would split them)."""
  same = dict(
    ids=jnp.tile(inputs["ids"][:1], (B, 1)),
    mask=jnp.ones((B, LEN), jnp.int32),
    vision=jnp.tile(inputs["vision"][:1], (B, 1, 1)),
    vmask=jnp.ones((B, S), jnp.int32),
  )
  m = host_model(config(0.5, 0.5, dropout=0.0))  # the drop path is the only randomness
  det = nnx.jit(forward)(m, same, None)
  for seed in range(3):
    for out, ref in zip(nnx.jit(forward)(m, same, jax.random.key(seed)), det):
      out = np.asarray(out)
      np.testing.assert_allclose(out, np.broadcast_to(out[:1], out.shape), rtol=0, atol=1e-6)
      assert np.max(np.abs(out - np.asarray(ref))) > 1e-2  # and something was dropped


def test_deterministic_without_key(inputs):
  plain = nnx.jit(forward)(host_model(config()), inputs, None)
  for out, ref in zip(nnx.jit(forward)(host_model(config(0.5, 0.5)), inputs, None), plain):
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_expectation_is_preserved(inputs):
  """The mean over many keys is close to the deterministic output (loosely: LayerNorm after each
  residual add is not linear), much closer than a single draw."""
  m = host_model(config(0.3, 0.3, dropout=0.0))
  graphdef, state = nnx.split(m)
  run = lambda s, k: forward(nnx.merge(graphdef, s), inputs, k)
  keys = jax.random.split(jax.random.key(11), 256)
  draws = jax.jit(jax.vmap(run, in_axes=(None, 0)))(state, keys)
  for out, ref in zip(draws, nnx.jit(forward)(m, inputs, None)):
    out, ref = np.asarray(out), np.asarray(ref)
    single = np.abs(out - ref).mean()
    assert single > 0.02  # each draw is far from the deterministic output ...
    assert np.abs(out.mean(0) - ref).mean() < 0.25 * single  # ... their mean is close to it
    assert np.abs(out.mean(0) - ref).max() < 0.06


def test_gradients_flow(inputs):
  m = host_model(config(0.3, 0.3))

  def loss(model):
    text, fused = forward(model, inputs, jax.random.key(4))
    return jnp.sum(text**2) + jnp.sum(fused**2)

  grads = nnx.jit(nnx.grad(loss))(m)
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  for tower in (grads.text.layers, grads.fusion.layers):
    fc2 = np.asarray(tower.mlp.fc2.kernel[...])  # [depth, mlp, D]
    assert all(np.abs(fc2[i]).max() > 0 for i in range(fc2.shape[0]))  # every layer learns
  assert np.abs(np.asarray(grads.text.embeddings.word[...])).max() > 0
