"""Image/video-text retrieval metrics with the official protocol.

Official protocol: docs/fidelity.md#retrieval-protocol. The evaluator never sees the model. It
receives

  image_feats  [Ni, E]  ITC-space image (or video) features, L2-normalised by the model
  text_feats   [Nt, E]  ITC-space text features
  txt2img      [Nt]     ground-truth image index of each text
  img2txt      Ni lists ground-truth text indices of each image (COCO/Flickr: 5 per image)
  itm_score_fn (image_indices [C], text_indices [C]) -> [C] raw ITM logit of class 1

and does what the official evaluation does: sims = image_feats · text_featsᵀ; for every image
its top-k texts by similarity are re-scored with the ITM logit and all other texts get -100;
symmetrically every text re-scores its top-k images. Recall@{1,5,10} in percent for both
directions, their means and r_mean = mean of the six (the official `itm_eval`).

Ties: a ground truth that ties with other items is ranked after them (no credit from a tie).
With k >= 10 this only matters for exact float ties; the -100 fills of non-candidates can never
lift a ground truth into the top 10.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

ItmScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

# The score the official code gives to items outside the top-k candidates.
NOT_CANDIDATE = -100.0
RECALL_KS = (1, 5, 10)


def recall_at_k(ranks, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
  """Percentage of queries whose 0-based rank of the first ground truth is < k, per k."""
  ranks = np.asarray(ranks)
  if ranks.size == 0:
    raise ValueError("recall_at_k needs at least one query")
  return {k: 100.0 * float(np.mean(ranks < k)) for k in ks}


def _check_targets(num_images: int, num_texts: int, txt2img, img2txt):
  """Validates and converts the ground truth; errors name the field and the offending entry."""
  txt2img = np.asarray(txt2img)
  if txt2img.shape != (num_texts,) or not np.issubdtype(txt2img.dtype, np.integer):
    raise ValueError(
      f"txt2img must be {num_texts} integer image indices (one per text), "
      f"got shape {txt2img.shape} dtype {txt2img.dtype}"
    )
  bad = np.flatnonzero((txt2img < 0) | (txt2img >= num_images))
  if bad.size:
    raise ValueError(
      f"txt2img[{bad[0]}] = {txt2img[bad[0]]} is not an image index in [0, {num_images})"
    )
  if len(img2txt) != num_images:
    raise ValueError(f"img2txt must have one list per image ({num_images}), got {len(img2txt)}")
  gt_img, gt_txt = [], []
  for i, texts in enumerate(img2txt):
    texts = np.asarray(texts, dtype=np.int64).reshape(-1)
    if texts.size == 0:
      raise ValueError(f"img2txt[{i}] is empty: every image needs at least one ground-truth text")
    if ((texts < 0) | (texts >= num_texts)).any():
      raise ValueError(f"img2txt[{i}] = {texts.tolist()} has an index outside [0, {num_texts})")
    gt_img.append(np.full(texts.shape, i))
    gt_txt.append(texts)
  return txt2img.astype(np.int64), np.concatenate(gt_img), np.concatenate(gt_txt)


def _ranks_i2t(score_i2t: np.ndarray, gt_img: np.ndarray, gt_txt: np.ndarray) -> np.ndarray:
  """[Ni] 0-based rank of the best-placed ground-truth text of each image."""
  best = np.full(score_i2t.shape[0], -np.inf, dtype=score_i2t.dtype)
  np.maximum.at(best, gt_img, score_i2t[gt_img, gt_txt])
  return (score_i2t >= best[:, None]).sum(axis=1) - 1


def _ranks_t2i(score_t2i: np.ndarray, txt2img: np.ndarray) -> np.ndarray:
  """[Nt] 0-based rank of each text's ground-truth image."""
  gt = score_t2i[np.arange(score_t2i.shape[0]), txt2img]
  return (score_t2i >= gt[:, None]).sum(axis=1) - 1


def retrieval_metrics(
  score_i2t, score_t2i, txt2img, img2txt, prefix: str = "retrieval"
) -> dict[str, float]:
  """The official `itm_eval` metrics from two score matrices.

  Args:
    score_i2t: [Ni, Nt] score of every text for every image (higher is better).
    score_t2i: [Nt, Ni] score of every image for every text.
    txt2img, img2txt: ground truth (see the module docstring).
    prefix: metric-name prefix.

  Returns:
    {prefix/txt_r1, txt_r5, txt_r10, img_r1, img_r5, img_r10, txt_r_mean, img_r_mean, r_mean},
    in percent. 'txt_r*' is image -> text retrieval (the text found for an image query).
  """
  score_i2t = np.asarray(score_i2t, np.float32)
  score_t2i = np.asarray(score_t2i, np.float32)
  num_images, num_texts = score_i2t.shape
  if score_t2i.shape != (num_texts, num_images):
    raise ValueError(
      f"score_t2i must be [{num_texts}, {num_images}] (transpose of score_i2t "
      f"{score_i2t.shape}), got {score_t2i.shape}"
    )
  txt2img, gt_img, gt_txt = _check_targets(num_images, num_texts, txt2img, img2txt)
  tr = recall_at_k(_ranks_i2t(score_i2t, gt_img, gt_txt))
  ir = recall_at_k(_ranks_t2i(score_t2i, txt2img))
  out = {f"{prefix}/txt_r{k}": v for k, v in tr.items()}
  out.update({f"{prefix}/img_r{k}": v for k, v in ir.items()})
  out[f"{prefix}/txt_r_mean"] = float(np.mean(list(tr.values())))
  out[f"{prefix}/img_r_mean"] = float(np.mean(list(ir.values())))
  out[f"{prefix}/r_mean"] = (out[f"{prefix}/txt_r_mean"] + out[f"{prefix}/img_r_mean"]) / 2
  return out


def mean_over_splits(metrics: dict[str, float], prefixes: Sequence[str], out: str) -> dict:
  """The mean of each metric over the splits `prefixes` (every split has the same names):
  {out/<name>: mean}; e.g. the per-language retrieval metrics -> their mean over languages."""
  if not prefixes:
    raise ValueError("no splits to average")
  names = sorted(k[len(prefixes[0]) + 1 :] for k in metrics if k.startswith(prefixes[0] + "/"))
  names = [n for n in names if n != "seconds"]
  missing = [f"{p}/{n}" for p in prefixes for n in names if f"{p}/{n}" not in metrics]
  if missing:
    raise ValueError(f"splits differ in their metrics: {missing[:3]} missing")
  return {f"{out}/{n}": float(np.mean([metrics[f"{p}/{n}"] for p in prefixes])) for n in names}


def similarities(image_feats, text_feats) -> np.ndarray:
  """[Ni, Nt] = image_feats · text_featsᵀ in float32 (features are already normalised)."""
  img = np.asarray(image_feats, np.float32)
  txt = np.asarray(text_feats, np.float32)
  if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
    raise ValueError(
      f"image_feats [Ni, E] and text_feats [Nt, E] must share E, got {img.shape} and {txt.shape}"
    )
  return img @ txt.T


def _top_k(rows: np.ndarray, k: int) -> np.ndarray:
  """[R, k] column indices of the k largest entries of each row (unordered)."""
  if k >= rows.shape[1]:
    return np.broadcast_to(np.arange(rows.shape[1]), (rows.shape[0], rows.shape[1]))
  return np.argpartition(-rows, k - 1, axis=1)[:, :k]


def _score_pairs(
  pairs_img: np.ndarray, pairs_txt: np.ndarray, itm_score_fn: ItmScoreFn, chunk_size: int
) -> np.ndarray:
  """ITM scores of the given pairs, calling `itm_score_fn` on fixed-size chunks.

  The last chunk is padded (by repeating its last pair) so that a jitted scorer compiles once.
  """
  n = pairs_img.shape[0]
  out = np.empty((n,), np.float32)
  for start in range(0, n, chunk_size):
    stop = min(start + chunk_size, n)
    img = np.empty((chunk_size,), np.int32)
    txt = np.empty((chunk_size,), np.int32)
    img[: stop - start], txt[: stop - start] = pairs_img[start:stop], pairs_txt[start:stop]
    img[stop - start :], txt[stop - start :] = pairs_img[stop - 1], pairs_txt[stop - 1]
    scores = np.asarray(itm_score_fn(img, txt), np.float32)
    if scores.shape != (chunk_size,):
      raise ValueError(
        f"itm_score_fn must return one score per pair, shape ({chunk_size},); got {scores.shape}"
      )
    out[start:stop] = scores[: stop - start]
  return out


def itm_rerank_scores(
  sims, itm_score_fn: ItmScoreFn, k: int, chunk_size: int = 256, k_t2i: int | None = None
):
  """Official re-ranking: ITM logits for each query's top-k candidates, -100 elsewhere.

  Args:
    sims: [Ni, Nt] ITC similarities.
    itm_score_fn: (image_indices [C], text_indices [C]) -> [C] ITM logit of class 1.
    k: candidates per query (`k_test`; the paper uses 80 for COCO and 32 for Flickr30K); with
      `k_t2i`, texts per image query only.
    chunk_size: pairs per `itm_score_fn` call.
    k_t2i: images per text query when it differs from `k` (MVPTR's k_c / k_i).

  Returns:
    (score_i2t [Ni, Nt], score_t2i [Nt, Ni]) float32.
  """
  sims = np.asarray(sims, np.float32)
  num_images, num_texts = sims.shape
  k_t2i = k if k_t2i is None else k_t2i
  if min(k, k_t2i, chunk_size) < 1:
    raise ValueError(f"k ({k}, {k_t2i}) and chunk_size ({chunk_size}) must be >= 1")
  top_t = _top_k(sims, min(k, num_texts))  # [Ni, k] texts per image
  top_i = _top_k(sims.T, min(k_t2i, num_images))  # [Nt, k_t2i] images per text
  pair_img = np.concatenate([np.repeat(np.arange(num_images), top_t.shape[1]), top_i.reshape(-1)])
  pair_txt = np.concatenate([top_t.reshape(-1), np.repeat(np.arange(num_texts), top_i.shape[1])])
  # A pair that is a candidate in both directions is scored once (the ITM logit of a pair does
  # not depend on the direction of the query).
  keys, inverse = np.unique(pair_img.astype(np.int64) * num_texts + pair_txt, return_inverse=True)
  unique_scores = _score_pairs(keys // num_texts, keys % num_texts, itm_score_fn, chunk_size)
  scores = unique_scores[inverse.reshape(-1)]
  score_i2t = np.full((num_images, num_texts), NOT_CANDIDATE, np.float32)
  score_t2i = np.full((num_texts, num_images), NOT_CANDIDATE, np.float32)
  n_i2t = num_images * top_t.shape[1]
  score_i2t[pair_img[:n_i2t], pair_txt[:n_i2t]] = scores[:n_i2t]
  score_t2i[pair_txt[n_i2t:], pair_img[n_i2t:]] = scores[n_i2t:]
  return score_i2t, score_t2i


def evaluate_retrieval(
  image_feats,
  text_feats,
  txt2img,
  img2txt,
  itm_score_fn: ItmScoreFn,
  *,
  k_test: int,
  chunk_size: int = 256,
  prefix: str = "retrieval",
) -> dict[str, float]:
  """The official retrieval evaluation: ITC top-k candidates re-ranked by ITM.

  `k_test` candidates per query (paper: 80 COCO, 32 Flickr30K); see `itm_rerank_scores`.
  """
  sims = similarities(image_feats, text_feats)
  _check_targets(sims.shape[0], sims.shape[1], txt2img, img2txt)  # fail before any ITM call
  score_i2t, score_t2i = itm_rerank_scores(sims, itm_score_fn, k_test, chunk_size)
  return retrieval_metrics(score_i2t, score_t2i, txt2img, img2txt, prefix)


def evaluate_retrieval_itc(
  image_feats, text_feats, txt2img, img2txt, *, prefix: str = "retrieval_itc"
) -> dict[str, float]:
  """Retrieval ranked by ITC similarity only (no ITM re-ranking)."""
  sims = similarities(image_feats, text_feats)
  return retrieval_metrics(sims, sims.T, txt2img, img2txt, prefix)
