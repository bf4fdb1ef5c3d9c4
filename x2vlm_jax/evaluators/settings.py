"""What each evaluator is told to do: typed settings built from the config's `eval` section by
`run_config.eval_config` (the one place a config becomes settings).

Every evaluator reads one or more named *splits*, each a list of source entries (the same
`{'type': ..., ...}` entries as training data). In the config, `data` is either a list of entries
(one unnamed split: metrics `eval/<evaluator>/<metric>`) or a dict split name -> list of entries
(metrics `eval/<evaluator>/<split>/<metric>`, e.g. `eval/grounding/testA/acc`).
"""

from __future__ import annotations

import dataclasses

Splits = tuple[tuple[str, tuple[dict, ...]], ...]  # ((split name or '', source entries), ...)


@dataclasses.dataclass(frozen=True)
class RetrievalSettings:
  """Image-text (kind 'image') or video-text (kind 'video') retrieval: ITC ranking, then the
  official ITM re-ranking of the top `k_test` candidates per query, `itm_chunk` pairs per ITM
  call, at most `max_images` images or videos per split (0 = all)."""

  data: Splits
  kind: str = "image"
  k_test: int = 16
  itm_chunk: int = 64
  max_images: int = 0
  # Non-empty: also the mean of every metric over the splits, as `<prefix>/<mean_name>/...`
  # (multilingual retrieval: one split per language, selected on the mean r_mean over the
  # languages as the official XRetrieval.py does; docs/multilingual.md#retrieval).
  mean_name: str = ""


@dataclasses.dataclass(frozen=True)
class GroundingSettings:
  """Box grounding: accuracy at IoU >= 0.5 per split, at most `max_phrases` phrases (0 = all),
  and how many images the PNG of predicted vs true boxes shows."""

  data: Splits
  max_phrases: int = 0
  png_examples: int = 6


@dataclasses.dataclass(frozen=True)
class VqaSettings:
  """VQA: every question ranks the answer list (`answer_list`, a JSON list of strings) with the
  official decoder ranking of its `k_test` best first-token candidates; VQA accuracy where the
  split's file has answers; at most `max_questions` per split (0 = all). The official result
  file (question_id -> answer) of each split goes to `result_dir` (during training: the run's
  workdir when empty)."""

  data: Splits
  answer_list: str = ""
  k_test: int = 128
  max_questions: int = 0
  result_dir: str = ""


@dataclasses.dataclass(frozen=True)
class ClassifySettings:
  """NLVR2 or video QA: accuracy of the cls_head's argmax per split, at most `max_examples`
  per split (0 = all)."""

  data: Splits
  max_examples: int = 0


@dataclasses.dataclass(frozen=True)
class CaptionSettings:
  """Captioning: the official generation (`caption_decode.py`: `prompt`, `num_beams` beams,
  `max_length` steps, EOS forbidden for `min_length`, `length_penalty`, repeated
  `no_repeat_ngram`-grams banned) on at most `max_images` images per split (0 = all); COCO
  caption metrics against the split's captions and the result file `caption_result_<split>.json`
  in `result_dir` (during training: the run's workdir when empty). `official_length_cap`: the
  official step count, evaluation batch + max_length - prompt length (a quirk)."""

  data: Splits
  prompt: str = "a picture of"
  num_beams: int = 3
  max_length: int = 50
  min_length: int = 5
  length_penalty: float = 0.0
  no_repeat_ngram: int = 3
  max_images: int = 0
  result_dir: str = ""
  official_length_cap: bool = False


@dataclasses.dataclass(frozen=True)
class MvptrRetrievalSettings:
  """MVPTR retrieval (`evaluators/mvptr_retrieval.py`): VSC coarse ranking, then the joint
  pass's match probability re-ranks the top `k_c` texts per image and `k_i` images per text
  (official 128 / 64), on at most `max_images` images per split (0 = all). Entries:
  `{'type': 'oscar', 'spec': <Oscar-layout spec file>, 'data_dir': ''}`; the example lengths
  and the tokenizer are the run's (`EvalConfig.mvptr_inputs`)."""

  data: Splits
  k_c: int = 128
  k_i: int = 64
  max_images: int = 0


@dataclasses.dataclass(frozen=True)
class MvptrGroundingSettings:
  """MVPTR phrase grounding (`evaluators/mvptr_retrieval.py`): the region of highest phrase
  similarity, correct at IoU > 0.5, over every grounded phrase of a synthetic layout (the
  targets of `mvptr_grounding_file.grounding_targets`), at most `max_phrases` per split (0 = all).
  `variant` 'paper' (zero-shot: mean phrase token vs regions, last layer) or 'code' (the
  fine-tuned [CLS] query at the phrase layer). Entries: as retrieval."""

  data: Splits
  variant: str = "code"
  max_phrases: int = 0


@dataclasses.dataclass(frozen=True)
class MvptrTaskSettings:
  """MVPTR VQA (`mvptr_vqa`: VQA score of the argmax answer) or SNLI-VE (`mvptr_ve`:
  accuracy), `evaluators/mvptr_qa.py`, on at most `max_rows` rows per split (0 = all). Entries:
  `{'type': 'task', 'spec': <task spec of data_pipelines/mvptr_task_sources.py>}`; the example
  lengths and the tokenizer are the run's (`EvalConfig.mvptr_inputs`). VQA also writes the
  official result file (question_id -> answer; test splits have no answers, only this file) of
  each split to `result_dir` (during training: the run's workdir when empty)."""

  data: Splits
  max_rows: int = 0
  result_dir: str = ""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Which evaluators run (a section each; None = not run) and the batch per jitted call."""

  retrieval: RetrievalSettings | None = None
  grounding: GroundingSettings | None = None
  vqa: VqaSettings | None = None
  nlvr2: ClassifySettings | None = None
  video_qa: ClassifySettings | None = None
  caption: CaptionSettings | None = None
  mvptr_retrieval: MvptrRetrievalSettings | None = None
  mvptr_grounding: MvptrGroundingSettings | None = None
  mvptr_vqa: MvptrTaskSettings | None = None
  mvptr_ve: MvptrTaskSettings | None = None
  batch_size: int = 32
  # MVPTR runs: (MvptrExampleSpec, tokenizer dir) of the run's `data` section, which the MVPTR
  # evaluators read their splits with (`run_config_mvptr.eval_inputs`; None elsewhere).
  mvptr_inputs: object = None

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(n for n in EVALUATORS if getattr(self, n) is not None)


# Config name -> settings type: the explicit table of evaluators.
EVALUATORS = {
  "retrieval": RetrievalSettings,
  "grounding": GroundingSettings,
  "vqa": VqaSettings,
  "nlvr2": ClassifySettings,
  "video_qa": ClassifySettings,
  "caption": CaptionSettings,
  "mvptr_retrieval": MvptrRetrievalSettings,
  "mvptr_grounding": MvptrGroundingSettings,
  "mvptr_vqa": MvptrTaskSettings,
  "mvptr_ve": MvptrTaskSettings,
}


def prefix(evaluator: str, split: str) -> str:
  """Metric prefix of one split: 'eval/retrieval' or 'eval/retrieval/test'."""
  return f"eval/{evaluator}" + (f"/{split}" if split else "")
