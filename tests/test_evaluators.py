"""Tests of the retrieval and grounding evaluators on hand-made inputs with hand-computed
results."""

import numpy as np
import pytest

from x2vlm_jax import evaluators
from x2vlm_jax.evaluators import grounding, retrieval

# 3 images, 5 texts; image 0 has two captions (0, 1), image 1 two (2, 3), image 2 one (4).
IMG2TXT = [[0, 1], [2, 3], [4]]
TXT2IMG = [0, 0, 1, 1, 2]
SIMS = np.array(
  [[0.9, 0.1, 0.8, 0.2, 0.3], [0.7, 0.6, 0.5, 0.1, 0.4], [0.2, 0.3, 0.1, 0.9, 0.5]], np.float32
)
# ITM logits (class 1) of every (image, text) pair.
ITM = np.array(
  [[3.0, 5.0, 2.0, 0.0, 0.5], [2.5, 0.0, 6.0, 4.0, 0.0], [0.0, 8.0, 0.0, 2.0, 7.0]], np.float32
)
# Features whose dot products are exactly SIMS.
IMG_FEATS, TXT_FEATS = np.eye(3, dtype=np.float32), SIMS.T.copy()


def test_recall_at_k():
  assert retrieval.recall_at_k([0, 3, 7, 12]) == {1: 25.0, 5: 50.0, 10: 75.0}
  assert retrieval.recall_at_k([1, 1], ks=(1, 2)) == {1: 0.0, 2: 100.0}


def test_itc_only_retrieval():
  # image -> text ranks of the best ground truth: img0 t0 first (0); img1 order t0 t1 t2 (2);
  # img2 order t3 t4 (1). text -> image ranks: t0 0, t1 2, t2 1, t3 2, t4 0.
  m = evaluators.evaluate_retrieval_itc(IMG_FEATS, TXT_FEATS, TXT2IMG, IMG2TXT)
  assert m["retrieval_itc/txt_r1"] == pytest.approx(100 / 3)
  assert m["retrieval_itc/txt_r5"] == m["retrieval_itc/txt_r10"] == 100.0
  assert m["retrieval_itc/img_r1"] == pytest.approx(40.0)
  assert m["retrieval_itc/img_r_mean"] == pytest.approx(80.0)
  assert m["retrieval_itc/r_mean"] == pytest.approx((100 / 3 + 200) / 6 + 80 / 2)


def test_itm_reranked_retrieval():
  calls = []

  def itm_score_fn(img, txt):
    calls.append((img.copy(), txt.copy()))
    return ITM[img, txt]

  # k = 3: image candidates img0 {t0,t2,t4}, img1 {t0,t1,t2}, img2 {t3,t4,t1}; each text has all
  # 3 images. ITM changes top-1 of img1 (t2, its caption, beats t0) and img0 keeps t0 although
  # its other caption t1 (logit 5) is no candidate and gets -100.
  # image -> text ranks [0, 0, 1]; text -> image ranks [0, 1, 0, 0, 0].
  m = evaluators.evaluate_retrieval(
    IMG_FEATS, TXT_FEATS, TXT2IMG, IMG2TXT, itm_score_fn, k_test=3, chunk_size=4
  )
  assert m["retrieval/txt_r1"] == pytest.approx(200 / 3)
  assert m["retrieval/img_r1"] == pytest.approx(80.0)
  assert m["retrieval/txt_r5"] == m["retrieval/img_r10"] == 100.0
  assert m["retrieval/txt_r_mean"] == pytest.approx((200 / 3 + 200) / 3)
  assert m["retrieval/img_r_mean"] == pytest.approx(280 / 3)
  assert m["retrieval/r_mean"] == pytest.approx(((200 / 3 + 200) / 3 + 280 / 3) / 2)
  assert set(m) == {f"retrieval/{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)} | {
    "retrieval/txt_r_mean",
    "retrieval/img_r_mean",
    "retrieval/r_mean",
  }
  # 15 distinct pairs (9 image-query pairs are also text-query pairs): 4 fixed-size calls.
  assert [c[0].shape for c in calls] == [(4,)] * 4
  scored = {(int(i), int(t)) for c in calls for i, t in zip(*c)}
  assert len(scored) == 15


def test_rerank_scores_fill_non_candidates():
  s_i2t, s_t2i = retrieval.itm_rerank_scores(SIMS, lambda i, t: ITM[i, t], k=2, chunk_size=64)
  # img0's top-2 texts by similarity are t0, t2; everything else is -100.
  np.testing.assert_array_equal(s_i2t[0], [3.0, -100.0, 2.0, -100.0, -100.0])
  # t3's top-2 images are img2 (0.9) and img0 (0.2).
  np.testing.assert_array_equal(s_t2i[3], [0.0, -100.0, 2.0])
  # With k=2, img1's captions t2/t3 are outside its candidates {t0, t1}: its rank is past the top 2.
  m = retrieval.retrieval_metrics(s_i2t, s_t2i, TXT2IMG, IMG2TXT)
  # img0 hits (t0: 3 > 2); img2's candidates are t3, t4 (t1 is not one), so t4 (7) wins;
  # img1 misses.
  assert m["retrieval/txt_r1"] == pytest.approx(200 / 3)
  assert m["retrieval/txt_r5"] == 100.0


def test_retrieval_bad_inputs():
  with pytest.raises(ValueError, match=r"txt2img\[2\] = 7"):
    evaluators.evaluate_retrieval_itc(IMG_FEATS, TXT_FEATS, [0, 0, 7, 1, 2], IMG2TXT)
  with pytest.raises(ValueError, match=r"img2txt\[1\] is empty"):
    evaluators.evaluate_retrieval_itc(IMG_FEATS, TXT_FEATS, TXT2IMG, [[0, 1], [], [4]])
  with pytest.raises(ValueError, match="share E"):
    evaluators.evaluate_retrieval_itc(IMG_FEATS, TXT_FEATS[:, :2], TXT2IMG, IMG2TXT)
  with pytest.raises(ValueError, match="one score per pair"):
    evaluators.evaluate_retrieval(
      IMG_FEATS, TXT_FEATS, TXT2IMG, IMG2TXT, lambda i, t: np.zeros(3), k_test=2, chunk_size=4
    )


def _case(gt_xywh, pred_xywh, wh):
  """A grounding example given the prediction in pixels (converted to normalised cx, cy, w, h)."""
  x, y, w, h = pred_xywh
  W, H = wh
  return [(x + w / 2) / W, (y + h / 2) / H, w / W, h / H], list(wh), list(gt_xywh)


def test_grounding_accuracy():
  cases = [
    _case((10, 10, 40, 20), (10, 10, 40, 20), (100, 50)),  # exact: IoU 1; whole image 0.16
    _case((0, 0, 20, 20), (10, 0, 20, 20), (100, 100)),  # inclusive inter 10x20: 200/600
    _case((0, 0, 48, 8), (16, 0, 48, 8), (128, 8)),  # 32x8=256 / 512 = 0.5 exactly: correct
    _case((0, 0, 48, 8), (17, 0, 48, 8), (128, 8)),  # 31x8=248 / 520 < 0.5
    _case((0, 0, 64, 40), (0, 48, 16, 16), (64, 64)),  # no overlap; whole image 2560/4096
  ]
  pred, wh, gt = (np.array(c, np.float32) for c in zip(*cases))
  m = evaluators.evaluate_grounding(pred, wh, gt)
  assert m["grounding/acc"] == pytest.approx(40.0)
  assert m["grounding/acc_whole_image"] == pytest.approx(20.0)
  assert m["grounding/mean_iou"] == pytest.approx((1 + 1 / 3 + 0.5 + 248 / 520 + 0) / 5, rel=1e-5)
  assert m["grounding/count"] == 5
  # The mean-box baseline on boxes that sit where their mean lies: (10, 10, 20, 20) and
  # (30, 30, 20, 20) in 100 x 100 images average to (20, 20, 20, 20), IoU 100/700 with each
  # (inclusive pixels: 10 x 10 overlap); a third, identical to the mean, is hit.
  mb = [
    _case(b, (0, 0, 1, 1), (100, 100))
    for b in ((10, 10, 20, 20), (30, 30, 20, 20), (20, 20, 20, 20))
  ]
  m3 = evaluators.evaluate_grounding(*(np.array(c, np.float32) for c in zip(*mb)))
  assert m3["grounding/acc_mean_box"] == pytest.approx(100 / 3)
  np.testing.assert_allclose(
    grounding.pred_to_pixel_xywh(pred[:1], wh[:1]), [[10, 10, 40, 20]], atol=1e-4
  )

  # Padding rows (valid = 0) are ignored, whatever they hold.
  pad = (
    np.concatenate([pred, np.full((2, 4), np.nan, np.float32)]),
    np.concatenate([wh, np.ones((2, 2))]),
  )
  m2 = evaluators.evaluate_grounding(
    np.nan_to_num(pad[0]),
    pad[1],
    np.concatenate([gt, np.zeros((2, 4))]),
    valid=np.array([1, 1, 1, 1, 1, 0, 0]),
    prefix="grounding/val",
  )
  assert m2["grounding/val/acc"] == pytest.approx(40.0) and m2["grounding/val/count"] == 5


def test_grounding_bad_inputs():
  with pytest.raises(ValueError, match=r"image_wh\[1\] = \[0.0, 5.0\] must be positive"):
    evaluators.evaluate_grounding(np.zeros((2, 4)), [[4, 4], [0, 5]], np.zeros((2, 4)))
  with pytest.raises(ValueError, match="gt_boxes must be"):
    evaluators.evaluate_grounding(np.zeros((2, 4)), np.ones((2, 2)), np.zeros((3, 4)))
