"""Tests of the table-driven strict merge and the layout transforms (pure NumPy, fast)."""

import numpy as np
import pytest

from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import transforms as T


def _rng():
  return np.random.default_rng(0)


@pytest.mark.parametrize(
  "transform,ours_shape",
  [
    (T.LINEAR, (5, 7)),
    (T.CONV_OIHW, (4, 4, 3, 5)),
    (T.LINEAR_TO_HEADS, (7, 3, 5)),
    (T.BIAS_TO_HEADS, (3, 5)),
    (T.LINEAR_FROM_HEADS, (3, 5, 7)),
    (T.FUSED_QKV, (7, 3, 2, 5)),
    (T.reshape_transform("frames", lambda s: (1, s[0], 1, s[1])), (3, 7)),
  ],
)
def test_transforms_round_trip_and_shapes(transform, ours_shape):
  foreign_shape = transform.foreign_shape(ours_shape)
  x = _rng().standard_normal(foreign_shape).astype(np.float32)
  y = transform.to_ours(x, ours_shape)
  assert y.shape == ours_shape
  back = transform.to_foreign(y)
  assert back.shape == foreign_shape
  np.testing.assert_array_equal(back, x)


def test_heads_layout_matches_pytorch():
  # PyTorch q = x @ W.T + b, then view(..., H, dh): head h owns output rows h*dh..(h+1)*dh-1.
  din, h, dh = 7, 3, 5
  w = _rng().standard_normal((h * dh, din))
  x = _rng().standard_normal((2, din))
  torch_heads = (x @ w.T).reshape(2, h, dh)
  ours = T.LINEAR_TO_HEADS.to_ours(w, (din, h, dh))
  np.testing.assert_allclose(np.einsum("bd,dhk->bhk", x, ours), torch_heads, rtol=1e-12)
  # Output projection: concat heads then W_o.
  wo = _rng().standard_normal((din, h * dh))
  ctx = _rng().standard_normal((2, h, dh))
  ours_o = T.LINEAR_FROM_HEADS.to_ours(wo, (h, dh, din))
  np.testing.assert_allclose(
    np.einsum("bhk,hkd->bd", ctx, ours_o), ctx.reshape(2, -1) @ wo.T, rtol=1e-12
  )
  # Fused qkv: rows [q; k; v].
  wqkv = _rng().standard_normal((3 * h * dh, din))
  ours_qkv = T.FUSED_QKV.to_ours(wqkv, (din, 3, h, dh))
  np.testing.assert_array_equal(
    ours_qkv[:, 1], T.LINEAR_TO_HEADS.to_ours(wqkv[h * dh : 2 * h * dh], (din, h, dh))
  )


def test_split_join_stack_helpers():
  x = np.arange(2 * 12).reshape(2, 12)
  s = T.split_heads(x, 3)
  assert s.shape == (2, 3, 4)
  np.testing.assert_array_equal(T.join_heads(s), x)
  with pytest.raises(ValueError, match="not divisible"):
    T.split_heads(x, 5)
  st = T.stack_layers([x, x + 1])
  assert st.shape == (2, 2, 12)
  np.testing.assert_array_equal(T.unstack_layers(st)[1], x + 1)


RULES = [
  C.Rule(r"enc\.(?P<layer>\d+)\.w", "a.layers.kernel", T.LINEAR, layer_range=(0, 2)),
  C.Rule(
    r"enc\.(?P<layer>\d+)\.w", "b.layers.kernel", T.LINEAR, layer_offset=2, layer_range=(2, 3)
  ),
  C.Rule(r"emb", "emb"),
  C.Rule(r"dec", "emb", tied=True),
  C.Rule(r"idx", None, expect=lambda m: np.arange(4)),
]
EXPECTED = {
  "a": {"layers": {"kernel": ((2, 3, 5), np.float32)}},
  "b": {"layers": {"kernel": ((1, 3, 5), np.float32)}},
  "emb": ((4, 3), np.float32),
}


def _foreign():
  r = _rng()
  f = {f"enc.{i}.w": r.standard_normal((5, 3)).astype(np.float32) for i in range(3)}
  f["emb"] = r.standard_normal((4, 3)).astype(np.float32)
  f["dec"] = f["emb"].copy()
  f["idx"] = np.arange(4)
  return f


def test_merge_and_export_round_trip():
  f = _foreign()
  ours, rep = C.merge(f, RULES, EXPECTED)
  assert rep.ok() and not rep.missing and not rep.unexpected
  assert ours["a"]["layers"]["kernel"].shape == (2, 3, 5)
  np.testing.assert_array_equal(ours["b"]["layers"]["kernel"][0], f["enc.2.w"].T)
  back = C.export(ours, RULES, list(f))
  assert list(back) == list(f)
  for k in f:
    np.testing.assert_array_equal(back[k], f[k])
    assert back[k].dtype == f[k].dtype


@pytest.mark.parametrize(
  "edit,kind,name",
  [
    (lambda f: f.update(extra=np.zeros(1)), "unexpected", "extra"),
    (lambda f: f.pop("enc.1.w"), "missing", "a.layers.kernel[1]"),
    (lambda f: f.update({"enc.0.w": np.zeros((5, 4), np.float32)}), "shape", "enc.0.w"),
    (lambda f: f.update(dec=f["emb"] + 1), "check", "dec"),
    (lambda f: f.update(idx=np.arange(4)[::-1].copy()), "check", "idx"),
  ],
)
def test_merge_mismatches_are_named_and_allowable(edit, kind, name):
  f = _foreign()
  edit(f)
  with pytest.raises(C.ConversionError, match=name.replace("[", r"\[").replace("]", r"\]")) as e:
    C.merge(f, RULES, EXPECTED)
  assert getattr(e.value.report, kind)
  # Allowing exactly that kind turns the error into a report entry (a shape mismatch leaves the
  # slot unfilled, so it also counts as missing).
  allow = {kind, "missing"} if kind == "shape" else {kind}
  _, rep = C.merge(f, RULES, EXPECTED, allow=allow)
  assert any(name in x for x in getattr(rep, kind))


def test_merge_fills_missing_from_init_and_export_flags_unused():
  f = _foreign()
  del f["enc.2.w"]
  init = {"b": {"layers": {"kernel": np.full((1, 3, 5), 7.0, np.float32)}}}
  ours, rep = C.merge(f, RULES, EXPECTED, allow={"missing"}, init=init)
  assert rep.missing == ["b.layers.kernel"]
  assert (ours["b"]["layers"]["kernel"] == 7).all()
  with pytest.raises(C.ConversionError, match="b.layers.kernel"):
    C.export(ours, RULES, [k for k in f])
  with pytest.raises(ValueError, match="unknown mismatch kinds"):
    C.merge(f, RULES, EXPECTED, allow={"shapes"})
