"""MVPTR retrieval and phrase-grounding evaluation (docs/mvptr.md#fine-tuning).

Retrieval, as the official `run_retrieval.py` (`test_coarse`, `test_fine_i2t`, `test_fine_t2i`):
1. coarse: every text and every image through its uni-modal stack alone, VSC features
   (`MVPTR.text_global` / `vision_global`), similarities image x text;
2. fine: for each image its top `k_c` texts (official 128) and for each text its top `k_i` images
   (official 64) are re-scored by the joint pass: softmax probability of "match" (class 1 of the
   retrieval `classifier` on the pooler); everything outside the candidates ranks below them.
Metrics: `evaluators.retrieval.retrieval_metrics` names (`<prefix>/txt_r1` = image -> text ...,
`r_mean`) for the re-ranked scores, and the same under `<prefix>_uni` for the coarse ranking alone
(the paper's "MVPTR-Uni"). One difference from the official ranks: a ground truth outside the
candidates counts as rank `k` there and ranks after every candidate here; the two agree on
R@1/5/10 whenever k >= 10.

Phrase grounding: `tasks_mvptr.grounding_scores` (paper or code variant), the box with the highest
similarity among the real regions, correct if its IoU with the ground truth is > 0.5 (paper;
the code's `run_re.py` counts >= 0.5).

Inputs are host arrays, run through jitted functions in fixed-size blocks (the last block padded
by repeating its last row, so each function compiles once):
  images: regions [Ni, R, region_dim], region_mask [Ni, R], tag_ids [Ni, T], tag_mask [Ni, T]
  texts:  text_ids [Nt, L_A], text_mask [Nt, L_A]; txt2img [Nt] the image index of each text
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from x2vlm_jax import tasks_mvptr as TM
from x2vlm_jax.evaluators import retrieval as R
from x2vlm_jax.models.mvptr import MVPTR

IMAGE_FIELDS = ("regions", "region_mask", "tag_ids", "tag_mask")
TEXT_FIELDS = ("text_ids", "text_mask")
GROUNDING_FIELDS = IMAGE_FIELDS + TEXT_FIELDS + ("region_boxes", "gt_box")


def _arrays(data: Mapping, fields, what: str) -> dict[str, np.ndarray]:
  missing = [f for f in fields if f not in data]
  if missing:
    raise KeyError(f"MVPTR {what} inputs lack {missing} (have {sorted(data)})")
  out = {f: np.asarray(data[f]) for f in fields}
  n = {f: a.shape[0] for f, a in out.items()}
  if len(set(n.values())) != 1:
    raise ValueError(f"MVPTR {what} inputs differ in their first axis: {n}")
  if not next(iter(n.values())):
    raise ValueError(f"MVPTR {what} inputs are empty")
  return out


def retrieval_inputs(rows: Mapping, image_key: str = "image_id"):
  """One row per caption (e.g. `mvptr_stream.heldout_arrays`; captions of an image share its
  `image_key`) -> (images, texts, txt2img) for `evaluate_mvptr_retrieval`: each image's fields
  from its first caption row, images in order of first appearance."""
  ids = np.asarray(rows[image_key])
  _, first, txt2img = np.unique(ids, return_index=True, return_inverse=True)
  order = np.argsort(first)  # image index = order of first appearance
  rank = np.empty_like(order)
  rank[order] = np.arange(order.size)
  images = {k: np.asarray(rows[k])[first[order]] for k in IMAGE_FIELDS}
  texts = {k: np.asarray(rows[k]) for k in TEXT_FIELDS}
  return images, texts, rank[txt2img.reshape(-1)]


def _blocked(fn: Callable, state, arrays: dict[str, np.ndarray], block: int) -> np.ndarray:
  """fn(state, **block of arrays) over fixed-size blocks, concatenated and trimmed."""
  if block < 1:
    raise ValueError(f"block must be >= 1, got {block}")
  n = next(iter(arrays.values())).shape[0]
  outs = []
  for start in range(0, n, block):
    stop = min(start + block, n)
    take = np.minimum(np.arange(start, start + block), stop - 1)  # pad with the last row
    out = fn(state, **{k: a[take] for k, a in arrays.items()})
    outs.append(np.asarray(jax.device_get(out))[: stop - start])
  return np.concatenate(outs)


def _jitted(model: MVPTR):
  """(state, {name: jitted fn(state, **arrays)}) of the model's evaluation functions."""
  graphdef, state = nnx.split(model)

  def text_feats(state, text_ids, text_mask):
    m = nnx.merge(graphdef, state)
    return m.text_global(m.encode_text(text_ids, text_mask))

  def image_feats(state, regions, region_mask, tag_ids, tag_mask):
    m = nnx.merge(graphdef, state)
    return m.vision_global(m.encode_vision(tag_ids, tag_mask, regions, region_mask))

  def match_prob(state, **b):
    m = nnx.merge(graphdef, state)
    logits = m.classifier_logits(TM.joint(m, b).pooled)
    return jax.nn.softmax(logits, axis=-1)[:, 1]

  fns = {"text": text_feats, "image": image_feats, "match": match_prob}
  return state, {k: jax.jit(f) for k, f in fns.items()}


def features(model: MVPTR, images: Mapping, texts: Mapping, block: int = 64):
  """Coarse VSC features: (image_feats [Ni, D], text_feats [Nt, D]) float32, unit norm."""
  state, fns = _jitted(model)
  img = _blocked(fns["image"], state, _arrays(images, IMAGE_FIELDS, "image"), block)
  txt = _blocked(fns["text"], state, _arrays(texts, TEXT_FIELDS, "text"), block)
  return img, txt


def evaluate_mvptr_retrieval(
  model: MVPTR,
  images: Mapping,
  texts: Mapping,
  txt2img,
  *,
  k_c: int = 128,
  k_i: int = 64,
  block: int = 64,
  prefix: str = "mvptr_retrieval",
) -> dict[str, float]:
  """Coarse VSC ranking, then the top `k_c` texts per image / `k_i` images per text re-ranked by
  the joint pass's match probability (module docstring). k larger than the set = all of it."""
  if model.cfg.classifier_labels != 2:
    raise ValueError(
      f"retrieval re-ranking needs MvptrConfig(heads='retrieval'), got {model.cfg.heads!r}"
    )
  img_in, txt_in = _arrays(images, IMAGE_FIELDS, "image"), _arrays(texts, TEXT_FIELDS, "text")
  txt2img = np.asarray(txt2img)
  num_images = img_in["regions"].shape[0]
  img2txt = [np.flatnonzero(txt2img == i) for i in range(num_images)]
  state, fns = _jitted(model)
  image_feats = _blocked(fns["image"], state, img_in, block)
  text_feats = _blocked(fns["text"], state, txt_in, block)
  sims = R.similarities(image_feats, text_feats)  # [Ni, Nt]
  uni = R.retrieval_metrics(sims, sims.T, txt2img, img2txt, f"{prefix}_uni")  # validates too

  def match(img_idx, txt_idx):
    pairs = {k: a[img_idx] for k, a in img_in.items()} | {k: a[txt_idx] for k, a in txt_in.items()}
    return np.asarray(fns["match"](state, **pairs))

  score_i2t, score_t2i = R.itm_rerank_scores(sims, match, k_c, block, k_t2i=k_i)
  return R.retrieval_metrics(score_i2t, score_t2i, txt2img, img2txt, prefix) | uni


def grounding_accuracy(scores, region_boxes, region_mask, gt_box, *, inclusive: bool = False):
  """Percentage of rows whose best-scored real region has IoU > 0.5 with `gt_box` (>= 0.5 with
  `inclusive`, the official `run_re.py`). scores [N, R], region_boxes [N, R, 4] corners,
  region_mask [N, R], gt_box [N, 4]."""
  scores, mask = np.asarray(scores, np.float32), np.asarray(region_mask) > 0
  if scores.shape != mask.shape:
    raise ValueError(f"scores {scores.shape} and region_mask {mask.shape} differ")
  empty = np.flatnonzero(~mask.any(axis=1))
  if empty.size:
    raise ValueError(f"row {empty[0]} has no real region to ground to")
  iou = np.asarray(TM.region_iou(region_boxes, gt_box))
  best = np.argmax(np.where(mask, scores, -np.inf), axis=1)
  hit = iou[np.arange(len(best)), best]
  right = hit >= 0.5 if inclusive else hit > 0.5
  return 100.0 * float(np.mean(right))


def evaluate_mvptr_grounding(
  model: MVPTR, data: Mapping, *, variant: str = "code", block: int = 64, prefix="mvptr_grounding"
) -> dict[str, float]:
  """Grounding accuracy of `model` (fine-tuned, or the pre-trained one for the paper's
  zero-shot figure) on arrays with `GROUNDING_FIELDS` (+ `phrase_mask` for the paper variant)."""
  fields = GROUNDING_FIELDS + (("phrase_mask",) if variant == "paper" else ())
  arrays = _arrays(data, fields, "grounding")
  graphdef, state = nnx.split(model)

  def scores(state, **b):
    return TM.grounding_scores(nnx.merge(graphdef, state), b, variant=variant)

  sims = _blocked(jax.jit(scores), state, arrays, block)
  acc = grounding_accuracy(
    sims,
    arrays["region_boxes"],
    arrays["region_mask"],
    arrays["gt_box"],
    inclusive=variant == "code",
  )
  return {f"{prefix}/acc": acc}
