"""One MVPTR fine-tuning row: the two input streams of `mvptr_examples.build_example` without
masking (fine-tuning corrupts nothing) plus the targets each task of
`x2vlm_jax.tasks_mvptr` reads (docs/mvptr.md#fine-tuning):

  retrieval  the stream fields only (every row is a matched pair)
  vqa        answer_scores [A]: soft score of each answer index (official `target_tensor`)
  ve         ve_label: contradiction 0, neutral 1, entailment 2 (official `label_mapping`)
             (both tasks: `task_row` of a `mvptr_task_sources` record, with text_type_ids)
  grounding  region_boxes [max_regions, 4] corner boxes zero-padded like the regions, gt_box [4],
             phrase_mask [max_tokens + max_phrases]: 1 on the stream-A slots of a word-piece span
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.mvptr_examples import MvptrExampleSpec, build_example

VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}
STREAMS = ("text_ids", "text_mask", "tag_ids", "tag_mask", "regions", "region_mask")


def pair_fields(words, phrases, tags, regions, spec: MvptrExampleSpec) -> dict[str, np.ndarray]:
  """The stream fields of one image-text pair, nothing masked (numpy int32 / float32)."""
  plain = dataclasses.replace(spec, word_rate=0.0, tag_rate=0.0, phrase_rate=0.0)
  row = build_example(np.random.default_rng(0), words, phrases, tags, regions, plain)
  return {k: row[k] for k in STREAMS}


TARGETS = ("answer_scores", "ve_label")


def task_row(rng, record, spec: MvptrExampleSpec) -> dict[str, np.ndarray]:
  """A VQA / SNLI-VE row from a `mvptr_task_sources` record (the stream's `build`): the pair
  streams, then the record's `text_tags` appended to stream A after its [SEP] with segment 1,
  cut to the free slots (official `--use_b_text`), `text_type_ids`, and the task's target."""
  del rng  # fine-tuning masks nothing
  row = pair_fields(record["words"], record["phrases"], record["tags"], record["regions"], spec)
  n, la = int(row["text_mask"].sum()), row["text_ids"].shape[0]
  extra = np.asarray(record.get("text_tags", ()), np.int32)[: la - n]
  row["text_ids"][n : n + extra.size] = extra
  row["text_mask"][n : n + extra.size] = 1
  types = np.zeros(la, np.int32)
  types[n : n + extra.size] = 1
  row["text_type_ids"] = types
  for k in TARGETS:
    if k in record:
      row[k] = np.asarray(record[k])
  return row


def vqa_scores(answer_labels, scores, num_answers: int, record: str = "?") -> np.ndarray:
  """Answer indices and their soft scores -> [num_answers] float32 target (0 elsewhere)."""
  labels = np.asarray(answer_labels, np.int64).reshape(-1)
  values = np.asarray(scores, np.float32).reshape(-1)
  if labels.shape != values.shape:
    raise ValueError(f"record {record}: {labels.size} answer labels but {values.size} scores")
  bad = labels[(labels < 0) | (labels >= num_answers)]
  if bad.size:
    raise ValueError(f"record {record}: answer label {bad[0]} outside [0, {num_answers})")
  out = np.zeros(num_answers, np.float32)
  out[labels] = values  # a repeated label keeps its last score, as the official loop
  return out


def ve_label(name: str, record: str = "?") -> np.int32:
  """SNLI-VE gold label name -> class index."""
  if name not in VE_LABELS:
    raise ValueError(f"record {record}: gold_label {name!r} is not one of {sorted(VE_LABELS)}")
  return np.int32(VE_LABELS[name])


def grounding_fields(
  region_boxes, gt_box, span: tuple[int, int], num_words: int, spec: MvptrExampleSpec, record="?"
) -> dict[str, np.ndarray]:
  """Region corner boxes [n, 4] (cut / zero-padded to `max_regions` as the regions are), the
  ground-truth box [4] and the phrase mask of word pieces [start, end) of the caption (stream A
  slot 1 + i holds word piece i; `num_words` = the caption's word pieces before the cut)."""
  boxes = np.asarray(region_boxes, np.float32).reshape(-1, 4)
  gt = np.asarray(gt_box, np.float32).reshape(-1)
  if gt.shape != (4,):
    raise ValueError(f"record {record}: gt_box must hold 4 values, got {gt.size}")
  kept = min(num_words, spec.max_tokens - 2)
  start, end = span
  if not 0 <= start < end <= kept:
    raise ValueError(f"record {record}: phrase span {span} outside the {kept} kept word pieces")
  padded = np.zeros((spec.max_regions, 4), np.float32)
  n = min(spec.max_regions, boxes.shape[0])
  padded[:n] = boxes[:n]
  mask = np.zeros(spec.max_tokens + spec.max_phrases, np.int32)
  mask[1 + start : 1 + end] = 1
  return {"region_boxes": padded, "gt_box": gt, "phrase_mask": mask}


def region_boxes(regions) -> np.ndarray:
  """Corner boxes [..., 4] (x1/W, y1/H, x2/W, y2/H) read back from region vectors [..., dim]
  (their last 6 values are the box values of `mvptr_regions.box_values`)."""
  return np.asarray(regions, np.float32)[..., -6:-2]


def grounding_rows(rows, targets) -> dict[str, np.ndarray]:
  """Phrase-grounding rows from stacked unmasked example rows (e.g. `mvptr_stream.heldout_arrays`)
  and, per row and phrase slot, the region row the phrase denotes (-1 = none; e.g.
  `mvptr_grounding_file.grounding_targets`): one output row per grounded phrase with the stream
  fields, `region_boxes` from the region vectors, `gt_box` = the denoted region's box and a
  `phrase_mask` on the phrase's stream-A slot."""
  targets = np.asarray(targets)
  valid = np.asarray(rows["phrase_valid"]) > 0
  if targets.shape != valid.shape:
    raise ValueError(f"targets {targets.shape} must match phrase_valid {valid.shape}")
  n, p = np.nonzero((targets >= 0) & valid)
  k = targets[n, p]
  real = np.asarray(rows["region_mask"])[n, k] > 0
  if not real.all():
    i = int(np.flatnonzero(~real)[0])
    raise ValueError(f"row {n[i]} phrase {p[i]}: target region {k[i]} is padding")
  out = {name: np.asarray(rows[name])[n] for name in STREAMS}
  out["region_boxes"] = region_boxes(out["regions"])
  out["gt_box"] = out["region_boxes"][np.arange(len(n)), k]
  mask = np.zeros(out["text_ids"].shape, np.int32)
  mask[np.arange(len(n)), np.asarray(rows["phrase_positions"])[n, p]] = 1
  out["phrase_mask"] = mask
  return out
