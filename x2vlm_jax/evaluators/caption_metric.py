"""COCO caption metrics: BLEU-1..4, ROUGE-L and CIDEr-D with the pure-Python scorers of
`pycocoevalcap` 1.2 (the package the official `coco_caption_eval` calls), and the COCO caption
result format (docs/finetuning.md#caption-metrics).

Reported: `bleu_1` .. `bleu_4` (corpus BLEU, "closest" reference length, as COCO), `rouge_l`,
`cider` (pycocoevalcap's `Cider` is the CIDEr-D variant COCO reports: clipped n-gram counts,
Gaussian length penalty sigma 6, x10), all x100 as the paper's tables. Not reported: METEOR and
SPICE (they need Java and downloaded models) and nothing is computed with the PTB tokenizer
(Java). Instead `tokenize` is our own: lower case, words are runs of letters / digits that may
contain inner hyphens or apostrophes, every other character separates words and is dropped --
like PTBTokenizer with its punctuation removal, except that PTB splits a clitic off its word
("man's" -> "man 's") where we keep "man's" whole, so figures can differ slightly from the
official evaluation on text with apostrophes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def tokenize(text: str) -> str:
  """Our stand-in for the PTB tokenizer (module docstring): space-joined lower-case words."""
  return " ".join(_WORD.findall(str(text).lower()))


def score_captions(
  results: Mapping[object, str], references: Mapping[object, Sequence[str]]
) -> dict[str, float]:
  """Corpus metrics of one caption per image against its references (both keyed by image id;
  every result needs references). Values x100."""
  from pycocoevalcap.bleu.bleu import Bleu  # imported lazily: only evaluation needs it
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge

  missing = [k for k in results if not references.get(k)]
  if missing:
    raise ValueError(f"image ids {missing[:5]} have a result but no reference caption")
  if not results:
    raise ValueError("no captions to score")
  res = {k: [tokenize(v)] for k, v in results.items()}
  gts = {k: [tokenize(r) for r in references[k]] for k in results}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  rouge, _ = Rouge().compute_score(gts, res)
  cider, _ = Cider().compute_score(gts, res)
  out = {f"bleu_{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)}
  out.update(rouge_l=100.0 * float(rouge), cider=100.0 * float(cider))
  return out


def write_results(path: str, results: Mapping[object, str]) -> None:
  """The COCO caption result file: [{"image_id": ..., "caption": ...}], one per image."""
  rows = [{"image_id": k, "caption": v} for k, v in results.items()]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(rows, f)


def image_id_from_path(path: str):
  """The official Karpathy-split image id: the file name's digits after its last '_'
  (`COCO_val2014_000000391895.jpg` -> 391895); a name without them gives its stem."""
  stem = str(path).replace("\\", "/").split("/")[-1].rsplit(".", 1)[0]
  tail = stem.split("_")[-1]
  return int(tail) if tail.isdigit() else stem
