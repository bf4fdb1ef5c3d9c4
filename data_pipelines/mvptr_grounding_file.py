"""Phrase-grounding targets of an Oscar-layout split (docs/mvptr.md#fine-tuning): the JSON file
`grounding.json` beside the corpus TSV, one list per corpus line (in line order) giving, for each
scene-graph phrase of that line (in its phrase-file order), the row of the image's region the
phrase denotes, or -1 when it denotes none or several (an ambiguous phrase is not a target).

Written by the synthetic-world writer (`mvptr_synthetic.write`: exact, the world knows every
phrase's shape) and by the region-record converter (`mvptr_from_regions.convert_records`: a
phrase names one kept object elem of the record -> that elem's region row). Read by the grounding
stream and evaluator through `grounding_targets`.
"""

from __future__ import annotations

import json
import os

import numpy as np

GROUNDING_FILE = "grounding.json"


def write_grounding(root: str, lines: list[list[int]]) -> str:
  """Writes `root/grounding.json` (one target list per corpus line); returns its path."""
  path = os.path.join(root, GROUNDING_FILE)
  with open(path, "w", encoding="utf-8") as f:
    json.dump([[int(t) for t in line] for line in lines], f)
  return path


def grounding_targets(source, max_phrases: int) -> np.ndarray:
  """int32 [len(source), max_phrases]: for each record of an `OscarSource`, the region row each
  of its first max_phrases phrases denotes; -1 for a phrase without a target or an empty slot."""
  path = os.path.join(os.path.dirname(source.spec.corpus_file), GROUNDING_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path}: this layout has no phrase-grounding targets (write them with "
      "data_pipelines/tools/mvptr_convert.py or mvptr_synthetic.write_splits)"
    )
  with open(path, encoding="utf-8") as f:
    lines = json.load(f)
  out = np.full((len(source), max_phrases), -1, np.int32)
  for i in range(len(source)):
    line = source.location(i)[1]
    if not 1 <= line <= len(lines):
      raise ValueError(f"{path}: no targets for corpus line {line} ({len(lines)} lines)")
    g = lines[line - 1][:max_phrases]
    out[i, : len(g)] = g
  return out
