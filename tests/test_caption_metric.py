"""Caption metrics (x2vlm_jax/evaluators/caption_metric.py) on hand-made candidates and
references: BLEU and ROUGE-L worked out by hand, CIDEr-D from the definition, our tokenisation,
the result file and the official image ids."""

import collections
import json
import math

import numpy as np
import pytest

pytest.importorskip("pycocoevalcap")

from x2vlm_jax.evaluators import caption_metric as cm  # noqa: E402

RESULTS = {1: "A man rides a red horse.", 2: "two dogs play"}
REFS = {1: ["a man rides a red horse", "a person on a horse"], 2: ["Two dogs play in the park!"]}


def test_tokenize_drops_punctuation_and_keeps_inner_hyphens():
  assert cm.tokenize("A T-shirt, the man's  HAT... (red)!") == "a t-shirt the man's hat red"


def test_bleu_and_rouge_by_hand():
  m = cm.score_captions(RESULTS, REFS)
  # Every n-gram of both candidates occurs in a reference, so BLEU-n = brevity penalty:
  # candidate length 6 + 3 = 9, closest reference lengths 6 + 6 = 12 -> exp(1 - 12 / 9).
  for n in range(1, 5):
    assert m[f"bleu_{n}"] == pytest.approx(100 * math.exp(1 - 12 / 9), rel=1e-6)
  # ROUGE-L (beta 1.2): image 1 matches a reference (1); image 2 LCS 3 -> P 1, R 0.5.
  f2 = (1 + 1.2**2) * 1.0 * 0.5 / (0.5 + 1.2**2 * 1.0)
  assert m["rouge_l"] == pytest.approx(100 * (1 + f2) / 2, rel=1e-6)


def _cider_d(results, refs, sigma=6.0):
  """CIDEr-D from its definition (Vedantam et al.; the COCO variant): tf-idf n-gram vectors
  (document frequency over the images' reference sets), clipped numerator, Gaussian length
  penalty, x10, mean over references and n = 1..4, mean over images."""
  grams = lambda ws, n: collections.Counter(tuple(ws[i : i + n]) for i in range(len(ws) - n + 1))
  toks = {k: cm.tokenize(v).split() for k, v in results.items()}
  rtoks = {k: [cm.tokenize(r).split() for r in refs[k]] for k in results}
  df = collections.Counter()
  for k in results:
    df.update({g for r in rtoks[k] for n in range(1, 5) for g in grams(r, n)})
  log_n = np.log(float(len(results)))

  def vec(ws, n):
    c = grams(ws, n)
    v = {g: tf * (log_n - np.log(max(1.0, df[g]))) for g, tf in c.items()}
    return v, math.sqrt(sum(x * x for x in v.values())), len(ws)

  scores = []
  for k in results:
    per_n = []
    for n in range(1, 5):
      vc, nc, lc = vec(toks[k], n)
      s = 0.0
      for r in rtoks[k]:
        vr, nr, lr = vec(r, n)
        dot = sum(min(vc[g], vr[g]) * vr[g] for g in vc if g in vr)
        if nc and nr:
          s += dot / (nc * nr) * math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
      per_n.append(s / len(rtoks[k]))
    scores.append(10.0 * np.mean(per_n))
  return 100.0 * float(np.mean(scores))


def test_cider_d_matches_the_definition():
  results = {**RESULTS, 3: "a cat on a mat"}
  refs = {**REFS, 3: ["a cat sits on a mat", "the cat is on the mat"]}
  m = cm.score_captions(results, refs)
  assert m["cider"] == pytest.approx(_cider_d(results, refs), rel=1e-6)
  assert m["cider"] > 0


def test_result_file_and_image_ids(tmp_path):
  path = tmp_path / "res.json"
  cm.write_results(str(path), {391895: "a man", "x": "b"})
  assert json.loads(path.read_text()) == [
    {"image_id": 391895, "caption": "a man"},
    {"image_id": "x", "caption": "b"},
  ]
  assert cm.image_id_from_path("val2014/COCO_val2014_000000391895.jpg") == 391895
  assert cm.image_id_from_path("images/test/scene_a.png") == "scene_a"
  with pytest.raises(ValueError, match="no reference"):
    cm.score_captions({5: "a"}, {})
