"""Model numerics on the tiny config against NumPy: text/fusion towers with their masks, concept
pooling, video averaging with frame embedding, the heads, the reusable vision K/V, and the BEiT
relative-position geometry (index layout and the table resize of
docs/fidelity.md#relative-position-bias-resize)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from x2vlm_jax import treepath
from x2vlm_jax.models import X2VLM, ModelConfig, abstract_model
from x2vlm_jax.models import layers as L
from x2vlm_jax.models.vision import relative_position_index, resize_rel_pos_bias

CFG = ModelConfig.tiny(frame_len=2)


def host_model(cfg: ModelConfig, seed: int = 0) -> X2VLM:
  """Parameters filled on the host with N(0, 0.05^2) (LayerNorm scales around 1), no init
  compile."""
  graphdef, state = nnx.split(abstract_model(cfg))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    x = 0.05 * rng.standard_normal(s.shape)
    if "scale" in treepath.path_parts(path):
      x = x + 1.0
    return jnp.asarray(x, s.dtype)

  state = jax.tree_util.tree_map_with_path(fill, state)
  return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# NumPy references (float64).
# ---------------------------------------------------------------------------------------------


def p(x):
  return np.asarray(x[...], np.float64)


def np_ln(x, norm, i=None, eps=1e-12):
  s, b = p(norm.scale), p(norm.bias)
  if i is not None:
    s, b = s[i], b[i]
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * s + b


def np_gelu(x):
  from scipy.special import erf

  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def np_attention(xq, xkv, attn, i, key_mask, mask_value):
  """BERT attention of layer i: xq [B, L, D] attends to xkv [B, S, Dkv], key_mask [B, S]."""
  q = np.einsum("bld,dhk->blhk", xq, p(attn.query.kernel)[i]) + p(attn.query.bias)[i]
  k = np.einsum("bsd,dhk->bshk", xkv, p(attn.key.kernel)[i]) + p(attn.key.bias)[i]
  v = np.einsum("bsd,dhk->bshk", xkv, p(attn.value.kernel)[i]) + p(attn.value.bias)[i]
  scores = np.einsum("blhk,bshk->bhls", q, k) / np.sqrt(q.shape[-1])
  scores = scores + ((1.0 - key_mask) * mask_value)[:, None, None, :]
  w = np.exp(scores - scores.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  ctx = np.einsum("bhls,bshk->blhk", w, v)
  return np.einsum("blhk,hkd->bld", ctx, p(attn.out.kernel)[i]) + p(attn.out.bias)[i]


def np_mlp(x, mlp, i):
  h = np_gelu(x @ p(mlp.fc1.kernel)[i] + p(mlp.fc1.bias)[i])
  return h @ p(mlp.fc2.kernel)[i] + p(mlp.fc2.bias)[i]


def np_text(m, ids, mask):
  e = m.text.embeddings
  x = p(e.word)[ids] + p(e.position)[: ids.shape[1]][None] + p(e.token_type)[0]
  x = np_ln(x, e.norm)
  lay = m.text.layers
  for i in range(CFG.text.depth):
    x = np_ln(x + np_attention(x, x, lay.attn, i, mask, -10000.0), lay.attn_norm, i)
    x = np_ln(x + np_mlp(x, lay.mlp, i), lay.mlp_norm, i)
  return x


def np_fuse(m, text, tmask, vision, vmask):
  lay = m.fusion.layers
  x = text
  for i in range(CFG.fusion.depth):
    x = np_ln(x + np_attention(x, x, lay.self_attn, i, tmask, -10000.0), lay.self_norm, i)
    x = np_ln(x + np_attention(x, vision, lay.cross_attn, i, vmask, -1e9), lay.cross_norm, i)
    x = np_ln(x + np_mlp(x, lay.mlp, i), lay.mlp_norm, i)
  return x


def np_mlp_head(x, head):
  h = x @ p(head.fc1.kernel) + p(head.fc1.bias)
  h = np_gelu(np_ln(h, head.norm, eps=1e-5))
  return h @ p(head.fc2.kernel) + p(head.fc2.bias)


# ---------------------------------------------------------------------------------------------
# One jitted forward feeding every check.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run():
  model = host_model(CFG)
  rng = np.random.default_rng(0)
  n, b, t = 2, 3, CFG.vision.num_patches
  inputs = dict(
    pixels=rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
    frames=rng.integers(0, 256, (2, 2, 64, 64, 3), dtype=np.uint8),
    frame_valid=np.array([[1, 1], [1, 0]], np.int32),
    ids=rng.integers(1, 1000, (b, 7)).astype(np.int32),
    mask=np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], np.int32),
    image_index=np.array([1, 0, 1], np.int32),
    patch_mask=np.zeros((b, t), np.int32),
    positions=np.array([[1, 2], [3, 0], [1, 1]], np.int32),
  )
  inputs["patch_mask"][0, [0, 1, 4, 5]] = 1  # a 2x2 box in the top-left corner
  inputs["patch_mask"][1, :] = 1  # whole image
  inputs["patch_mask"][2, [10]] = 1  # a single patch

  @nnx.jit
  def forward(m, x):
    out = {}
    out["image"] = img = m.encode_image(x["pixels"])
    out["video"] = m.encode_video(x["frames"], x["frame_valid"])
    out["video_all"] = m.encode_video(x["frames"])
    out["video_all_valid"] = m.encode_video(x["frames"], jnp.ones((2, 2), jnp.int32))
    out["frame_tokens"] = m.encode_image(x["frames"].reshape((4, 64, 64, 3)))
    out["text"] = txt = m.encode_text(x["ids"], x["mask"])
    out["concepts"], out["concept_mask"] = cpt, cmask = m.concepts(
      img, x["patch_mask"], x["image_index"]
    )
    out["fused"] = fused = m.fuse(txt, x["mask"], cpt, cmask)
    kv = m.vision_kv(img)
    out["kv_key"] = kv.key
    out["fused_kv"] = m.fuse(txt, x["mask"], kv, cmask, kv_index=x["image_index"])
    out["fused_gathered"] = m.fuse(txt, x["mask"], img[x["image_index"]], cmask)
    out["fused_kv_gathered"] = m.fuse(txt, x["mask"], m.vision_kv(img[x["image_index"]]), cmask)
    out["itm"], out["box"] = m.itm_logits(fused), m.box(fused)
    out["mlm"] = m.mlm_logits(fused, x["positions"])
    out["itc_v"], out["itc_t"] = m.itc_features(img, txt)
    key = jax.random.key(3)
    out["text_drop"] = m.encode_text(x["ids"], x["mask"], key)
    out["text_drop_again"] = m.encode_text(x["ids"], x["mask"], key)
    out["fused_drop"] = m.fuse(txt, x["mask"], kv, cmask, kv_index=x["image_index"], key=key)
    return out

  outs = forward(model, {k: jnp.asarray(v) for k, v in inputs.items()})
  return model, inputs, jax.tree.map(np.asarray, outs)


def test_text_tower_and_mask_match_numpy(run):
  model, x, out = run
  ref = np_text(model, x["ids"], x["mask"].astype(np.float64))
  real = x["mask"].astype(bool)
  assert np.max(np.abs(out["text"][real] - ref[real])) < 1e-5
  assert np.max(np.abs(out["text"] - ref)) < 1e-4  # padded positions too (they attend as BERT)


def test_fusion_and_cross_mask_match_numpy(run):
  model, x, out = run
  ref = np_fuse(
    model,
    out["text"].astype(np.float64),
    x["mask"].astype(np.float64),
    out["concepts"].astype(np.float64),
    out["concept_mask"].astype(np.float64),
  )
  assert np.max(np.abs(out["fused"] - ref)) < 1e-4
  # The mask matters: without it the single-patch concept (row 2) would look elsewhere.
  unmasked = np_fuse(
    model,
    out["text"].astype(np.float64),
    x["mask"].astype(np.float64),
    out["concepts"].astype(np.float64),
    np.ones_like(out["concept_mask"], np.float64),
  )
  assert np.max(np.abs(unmasked[2] - ref[2])) > 1e-3


def test_vision_kv_reuse_is_identical(run):
  _, x, out = run
  assert out["kv_key"].shape == (
    CFG.fusion.depth,
    2,
    17,
    CFG.fusion.num_heads,
    CFG.text.width // CFG.fusion.num_heads,
  )
  np.testing.assert_allclose(out["fused_kv"], out["fused_gathered"], atol=1e-6, rtol=0)
  np.testing.assert_array_equal(out["fused_kv_gathered"], out["fused_gathered"])


def test_concepts_match_numpy(run):
  _, x, out = run
  img, pm, idx = out["image"], x["patch_mask"], x["image_index"]
  for row in range(3):
    patches = img[idx[row], 1:]
    want0 = patches[pm[row].astype(bool)].mean(axis=0)
    np.testing.assert_allclose(out["concepts"][row, 0], want0, atol=1e-6)
    np.testing.assert_array_equal(out["concepts"][row, 1:], patches)
    np.testing.assert_array_equal(out["concept_mask"][row], np.concatenate([[1], pm[row]]))
  # A whole-image concept's token 0 is the image's own mean token
  # (docs/fidelity.md#region-concepts).
  np.testing.assert_allclose(out["concepts"][1, 0], img[0, 0], atol=1e-6)


def test_video_mean_with_frame_embedding_matches_numpy(run):
  model, x, out = run
  frames = out["frame_tokens"].reshape(2, 2, 17, -1).astype(np.float64)
  e = p(model.frame_embed)  # [F, Dv]
  with_embed = frames + e[None, :, None, :]
  np.testing.assert_allclose(out["video_all"], with_embed.mean(axis=1), atol=1e-6)
  np.testing.assert_allclose(out["video_all_valid"], out["video_all"], atol=1e-6)
  np.testing.assert_allclose(out["video"][0], with_embed[0].mean(axis=0), atol=1e-6)
  np.testing.assert_allclose(out["video"][1], with_embed[1, 0], atol=1e-6)  # frame 1 invalid


def test_heads_match_numpy(run):
  model, x, out = run
  f = out["fused"].astype(np.float64)
  np.testing.assert_allclose(out["itm"], np_mlp_head(f[:, 0], model.itm_head), atol=1e-5)
  box = 1.0 / (1.0 + np.exp(-np_mlp_head(f[:, 0], model.box_head)))
  np.testing.assert_allclose(out["box"], box, atol=1e-6)
  h = np.take_along_axis(f, x["positions"][:, :, None], axis=1)
  mh = model.mlm_head
  h = np_ln(np_gelu(h @ p(mh.dense.kernel) + p(mh.dense.bias)), mh.norm)
  logits = h @ p(model.text.embeddings.word).T + p(mh.bias)  # decoder tied to word embeddings
  assert out["mlm"].shape == (3, 2, CFG.text.vocab_size)
  np.testing.assert_allclose(out["mlm"], logits, atol=1e-5)
  v = out["image"][:, 0].astype(np.float64) @ p(model.vision_proj.kernel) + p(
    model.vision_proj.bias
  )
  np.testing.assert_allclose(out["itc_v"], v / np.linalg.norm(v, axis=-1, keepdims=True), atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out["itc_t"], axis=-1), 1.0, atol=1e-6)


def test_dropout_only_with_key(run):
  _, _, out = run
  assert np.max(np.abs(out["text_drop"] - out["text"])) > 1e-3
  np.testing.assert_array_equal(out["text_drop"], out["text_drop_again"])
  assert np.max(np.abs(out["fused_drop"] - out["fused_kv"])) > 1e-3


def test_drop_path_and_dropout_statistics():
  x = jnp.ones((4000, 3, 2))
  y = np.asarray(L.drop_path(x, 0.25, jax.random.key(0)))
  kept = y[:, 0, 0] != 0
  assert abs(kept.mean() - 0.75) < 0.03  # one draw per sample ...
  assert np.all(y[kept] == pytest.approx(1 / 0.75)) and np.all(y[~kept] == 0)  # ... scaled 1/keep
  assert np.array_equal(np.asarray(L.drop_path(x, 0.25, None)), np.asarray(x))
  z = np.asarray(L.dropout(x, 0.1, jax.random.key(1)))
  assert abs((z != 0).mean() - 0.9) < 0.01 and np.allclose(z[z != 0], 1 / 0.9)


def test_bad_inputs_name_the_field(run):
  model, x, _ = run
  with pytest.raises(ValueError, match="pixels must be uint8"):
    model.encode_image(jnp.zeros((1, 64, 64, 3), jnp.float32))
  with pytest.raises(ValueError, match="pixels must be uint8"):
    model.encode_image(jnp.zeros((1, 32, 32, 3), jnp.uint8))
  with pytest.raises(ValueError, match="frame_len"):
    model.encode_video(jnp.zeros((1, 3, 64, 64, 3), jnp.uint8))
  with pytest.raises(ValueError, match="patch_mask"):
    model.concepts(jnp.zeros((2, 17, 36)), jnp.zeros((3, 15), jnp.int32), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="kv_index"):
    model.fuse(jnp.zeros((3, 7, 40)), jnp.ones((3, 7)), jnp.zeros((2, 17, 36)), jnp.ones((3, 17)))
  with pytest.raises(ValueError, match="max_positions"):
    model.encode_text(jnp.zeros((1, 65), jnp.int32), jnp.ones((1, 65), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Relative position bias geometry (docs/fidelity.md#relative-position-bias and the resize after it).
# ---------------------------------------------------------------------------------------------


def test_relative_position_index_at_384():
  idx = relative_position_index(24)
  assert idx.shape == (577, 577)
  assert idx[0, 0] == 2211 and set(idx[0, 1:]) == {2209} and set(idx[1:, 0]) == {2210}
  # patch a = (row 2, col 5), patch b = (row 7, col 1): (2-7+23)*47 + (5-1+23)
  a, b = 1 + 2 * 24 + 5, 1 + 7 * 24 + 1
  assert idx[a, b] == 18 * 47 + 27
  assert idx[1:, 1:].min() == 0 and idx[1:, 1:].max() == 47 * 47 - 1
  assert np.all(np.diag(idx)[1:] == 23 * 47 + 23)


def _geometric_axis(s, t):
  # Independent restatement of the official resize: bisection for q (geometric sum in closed
  # form, as the official code evaluates it -- the comparison decides the last bits of q), then
  # cumulative powers.
  lo, hi = 1.01, 1.5
  while hi - lo > 1e-6:
    q = (lo + hi) / 2
    if (1.0 - q ** (s // 2)) / (1.0 - q) > t // 2:
      hi = q
    else:
      lo = q
  d = np.cumsum([q**k for k in range(s // 2)])
  return np.concatenate([-d[::-1], [0.0], d])


def test_resize_rel_pos_bias_224_to_384():
  rng = np.random.default_rng(0)
  table = rng.standard_normal((732, 3)).astype(np.float32)
  np.testing.assert_array_equal(resize_rel_pos_bias(table, 14, 14), table)
  out = resize_rel_pos_bias(table, 14, 24)
  assert out.shape == (2212, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out[-3:], table[-3:])  # CLS rows kept
  # A bias linear in the (geometric) source coordinates is reproduced exactly on the integer
  # target grid by the interpolating bicubic spline: checks axis order and spacing. Targets a
  # hair outside the source extent (|d| = 23 > axis end) are clamped to it, as FITPACK's
  # evaluator does for interp2d too.
  axis = _geometric_axis(27, 47)
  rows, cols = np.meshgrid(axis, axis, indexing="ij")
  lin = np.stack([0.3 * rows - 0.1 * cols + 1.0, -0.2 * rows + 0.05 * cols], -1).reshape(-1, 2)
  lin = np.concatenate([lin, np.ones((3, 2))]).astype(np.float64)
  got = resize_rel_pos_bias(lin, 14, 24)
  tr, tc = np.meshgrid(np.arange(-23, 24), np.arange(-23, 24), indexing="ij")
  tr, tc = np.clip(tr, axis[0], axis[-1]), np.clip(tc, axis[0], axis[-1])
  want = np.stack([0.3 * tr - 0.1 * tc + 1.0, -0.2 * tr + 0.05 * tc], -1).reshape(-1, 2)
  np.testing.assert_allclose(got[:-3], want, atol=1e-9)
  assert abs(axis[-1] - 23) < 0.05  # the source extent is stretched to the target's
  with pytest.raises(ValueError, match="does not fit"):
    resize_rel_pos_bias(table, 12, 24)
