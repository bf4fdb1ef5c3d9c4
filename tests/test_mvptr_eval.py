"""MVPTR retrieval re-ranking and grounding accuracy (x2vlm_jax/evaluators/mvptr_retrieval.py)
against brute force: every image-text pair through the joint pass at once, ranks in NumPy."""

import jax
import numpy as np
import pytest
from flax import nnx
from mvptr_testlib import random_model

from x2vlm_jax import tasks_mvptr as TM
from x2vlm_jax.evaluators import mvptr_retrieval as E
from x2vlm_jax.models.mvptr_config import MvptrConfig

NI, NT = 11, 22  # two texts per image: a non-candidate ground truth always ranks >= 10


def _data(cfg, seed=0):
  rng = np.random.default_rng(seed)
  r_len, t_len, a_len = rng.integers(2, 8, NI), rng.integers(2, 6, NI), rng.integers(3, 10, NT)
  images = dict(
    regions=rng.standard_normal((NI, 7, cfg.region_dim)).astype(np.float32),
    region_mask=(np.arange(7)[None] < r_len[:, None]).astype(np.int32),
    tag_ids=rng.integers(1, cfg.word_vocab_size, (NI, 5)),
    tag_mask=(np.arange(5)[None] < t_len[:, None]).astype(np.int32),
  )
  text_mask = (np.arange(9)[None] < a_len[:, None]).astype(np.int32)
  texts = dict(text_ids=rng.integers(1, cfg.vocab_size, (NT, 9)) * text_mask, text_mask=text_mask)
  txt2img = rng.permutation(np.repeat(np.arange(NI), 2))
  return images, texts, txt2img


@nnx.jit
def _brute(model, images, texts):
  """Global features of everything and the match probability of all NI x NT pairs."""
  img = model.vision_global(
    model.encode_vision(
      images["tag_ids"], images["tag_mask"], images["regions"], images["region_mask"]
    )
  )
  txt = model.text_global(model.encode_text(texts["text_ids"], texts["text_mask"]))
  ii, tt = np.repeat(np.arange(NI), NT), np.tile(np.arange(NT), NI)
  pairs = {k: v[ii] for k, v in images.items()} | {k: v[tt] for k, v in texts.items()}
  prob = jax.nn.softmax(model.classifier_logits(TM.joint(model, pairs).pooled), -1)[:, 1]
  return img, txt, prob.reshape(NI, NT)


def _recalls(score, is_gt):
  """R@1/5/10 (percent) of each row: rank of its best-scored ground truth, -inf = never found."""
  out = []
  for s, g in zip(score, is_gt):
    order = np.argsort(-s, kind="stable")
    hits = np.flatnonzero(g[order] & np.isfinite(s[order]))
    out.append(hits[0] if hits.size else np.inf)
  ranks = np.asarray(out)
  return [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]


def _reference(sims, prob, txt2img, k_c, k_i):
  is_gt = txt2img[None, :] == np.arange(NI)[:, None]  # [NI, NT]
  top_t = np.argsort(-sims, axis=1)[:, :k_c]
  top_i = np.argsort(-sims.T, axis=1)[:, :k_i]
  i2t = np.full((NI, NT), -np.inf)
  t2i = np.full((NT, NI), -np.inf)
  for i in range(NI):
    i2t[i, top_t[i]] = prob[i, top_t[i]]
  for t in range(NT):
    t2i[t, top_i[t]] = prob[top_i[t], t]
  return _recalls(i2t, is_gt), _recalls(t2i, is_gt.T)


@pytest.fixture(scope="module")
def setup():
  cfg = MvptrConfig.tiny(heads="retrieval")
  model = random_model(cfg, seed=8)
  images, texts, txt2img = _data(cfg)
  img, txt, prob = map(np.asarray, _brute(model, images, texts))
  return model, images, texts, txt2img, img @ txt.T, prob


@pytest.mark.parametrize("k_c,k_i", [(8, 4), (100, 64)], ids=["top_k", "k_beyond_n"])
def test_reranked_recalls_equal_brute_force(setup, k_c, k_i):
  model, images, texts, txt2img, sims, prob = setup
  got = E.evaluate_mvptr_retrieval(model, images, texts, txt2img, k_c=k_c, k_i=k_i, block=4)
  tr, ir = _reference(sims, prob, txt2img, k_c, k_i)
  if k_c < NT:  # the case tells the two k apart and differs from the coarse ranking
    assert _reference(sims, prob, txt2img, k_i, k_c) != (tr, ir)
    assert tr != _recalls(sims, txt2img[None, :] == np.arange(NI)[:, None])
  p = "mvptr_retrieval"
  np.testing.assert_allclose([got[f"{p}/txt_r{k}"] for k in (1, 5, 10)], tr)
  np.testing.assert_allclose([got[f"{p}/img_r{k}"] for k in (1, 5, 10)], ir)
  np.testing.assert_allclose(got[f"{p}/r_mean"], np.mean(tr + ir), rtol=1e-6)
  # The coarse ("MVPTR-Uni") ranking alone: every item a candidate, scored by the VSC cosine.
  is_gt = txt2img[None, :] == np.arange(NI)[:, None]
  np.testing.assert_allclose(
    [got[f"{p}_uni/txt_r{k}"] for k in (1, 5, 10)], _recalls(sims, is_gt), rtol=1e-6
  )
  np.testing.assert_allclose(
    [got[f"{p}_uni/img_r{k}"] for k in (1, 5, 10)], _recalls(sims.T, is_gt.T), rtol=1e-6
  )
  if k_c >= NT:  # every pair re-scored: the fine ranking is the match probability alone
    np.testing.assert_allclose([got[f"{p}/txt_r{k}"] for k in (1, 5, 10)], _recalls(prob, is_gt))


def test_retrieval_inputs_are_checked(setup):
  model, images, texts, txt2img, _, _ = setup
  with pytest.raises(KeyError, match="tag_mask"):
    E.evaluate_mvptr_retrieval(
      model, {k: v for k, v in images.items() if k != "tag_mask"}, texts, txt2img
    )
  bad = txt2img.copy()
  bad[bad == 3] = 0  # image 3 loses its texts
  with pytest.raises(ValueError, match=r"img2txt\[3\] is empty"):
    E.evaluate_mvptr_retrieval(model, images, texts, bad)


def test_grounding_accuracy_hand_made():
  boxes = np.array(
    [[[0, 0, 1, 1], [0, 0, 2, 1], [5, 5, 6, 6]], [[0, 0, 1, 1], [0, 0, 4, 4], [0, 0, 2, 2]]],
    np.float32,
  )
  gt = np.array([[0, 0, 2, 1], [0, 0, 2, 2]], np.float32)
  mask = np.array([[1, 1, 1], [1, 1, 0]])
  # Row 0 picks a box of IoU exactly 0.5; row 1's best score is on a padded region (ignored),
  # so it picks [0, 0, 4, 4] (IoU 0.25).
  scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.5, 0.99]])
  assert E.grounding_accuracy(scores, boxes, mask, gt) == 0.0  # paper: IoU > 0.5
  assert E.grounding_accuracy(scores, boxes, mask, gt, inclusive=True) == 50.0  # code: >= 0.5
  scores[1] = [0.1, 0.05, 0.99]
  assert E.grounding_accuracy(scores, boxes, mask, gt, inclusive=True) == 50.0
  mask[1] = [1, 0, 1]
  assert E.grounding_accuracy(scores, boxes, mask, gt) == 50.0  # row 1 now finds its box
  with pytest.raises(ValueError, match="row 1 has no real region"):
    E.grounding_accuracy(scores, boxes, np.array([[1, 1, 1], [0, 0, 0]]), gt)


def test_grounding_evaluation_in_blocks():
  cfg = MvptrConfig.tiny(heads="grounding")
  model = random_model(cfg, seed=9)
  images, texts, _ = _data(cfg, seed=3)
  rng = np.random.default_rng(4)
  corner = rng.uniform(0, 5, (NI, 7, 2))
  boxes = np.concatenate([corner, corner + rng.uniform(0.5, 3, (NI, 7, 2))], -1)
  data = images | {k: v[:NI] for k, v in texts.items()}
  data |= {"region_boxes": boxes.astype(np.float32), "gt_box": boxes[:, 0].astype(np.float32)}
  got = E.evaluate_mvptr_grounding(model, data, variant="code", block=4)
  sims = nnx.jit(lambda m, b: TM.grounding_scores(m, b, variant="code"))(model, data)
  want = E.grounding_accuracy(sims, boxes, data["region_mask"], data["gt_box"], inclusive=True)
  assert got == {"mvptr_grounding/acc": want}
  # Region 0 is the ground truth itself: a model scoring it highest everywhere gets 100.
  assert (
    E.grounding_accuracy(np.eye(7)[[0] * NI], boxes, data["region_mask"], data["gt_box"]) == 100.0
  )


def test_retrieval_inputs_from_caption_rows():
  rows = {
    "image_id": np.array([7, 7, 3, 9, 3]),
    "text_ids": np.arange(5)[:, None] * np.ones((1, 4), int),
    "text_mask": np.ones((5, 4), np.int32),
    "regions": np.arange(5)[:, None, None] * np.ones((1, 2, 3)),
    "region_mask": np.ones((5, 2)), "tag_ids": np.ones((5, 3)), "tag_mask": np.ones((5, 3)),
  }  # fmt: skip
  images, texts, txt2img = E.retrieval_inputs(rows)
  np.testing.assert_array_equal(txt2img, [0, 0, 1, 2, 1])
  np.testing.assert_array_equal(images["regions"][:, 0, 0], [0, 2, 3])  # first caption rows
  np.testing.assert_array_equal(texts["text_ids"][:, 0], np.arange(5))
