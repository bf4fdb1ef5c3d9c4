"""The config sections of the model-family switch (`model.family`) and of MVPTR runs, turned into
typed settings (the X²-VLM ones are `run_config.py`, which calls these):

  family(cfg)                               'x2vlm' (also when absent) | 'mvptr'
  check_task_family(task, cfg)              the task trains the configured family
  model_config(cfg.model, dtype)            MvptrConfig: `variant` tiny | base + `model.mvptr`
  streams_config(cfg, model_cfg, sizes)     MvptrStreamsConfig: `data.mvptr` + the model's sizes
  eval_inputs(cfg, model_cfg)               (example spec, tokenizer) of the MVPTR evaluators

Errors name the config field.
"""

from __future__ import annotations

import dataclasses

from data_pipelines import features as F
from data_pipelines.mvptr_examples import MvptrExampleSpec
from x2vlm_jax import assets, train_data
from x2vlm_jax.models.mvptr_config import MvptrConfig

FAMILIES = ("x2vlm", "mvptr")  # x2vlm_jax/models/family.py
# `data.mvptr` keys that are not example lengths / masking settings (MvptrExampleSpec).
SOURCE_KEYS = ("spec", "data_dir", "index_cache_dir")
# MvptrExampleSpec fields the model decides (one source of truth).
MODEL_KEYS = ("region_dim", "word_vocab_size", "vocab_size")


def family(cfg) -> str:
  """config.model.family: 'x2vlm' (also when absent: configs and saved runs before MVPTR) or
  'mvptr'."""
  name = str(cfg.model.get("family", "x2vlm"))
  if name not in FAMILIES:
    raise ValueError(f"config.model.family = {name!r}: expected one of {list(FAMILIES)}")
  return name


def check_task_family(task, cfg) -> None:
  """Raises naming both fields when `config.task` trains another family than the model's."""
  if task.family != family(cfg):
    raise ValueError(
      f"config.task = {task.name!r} trains a {task.family} model; config.model.family is "
      f"{family(cfg)!r}"
    )


def model_config(m, dtype) -> MvptrConfig:
  """MvptrConfig from a `model` section with family 'mvptr': `variant` 'tiny' | 'base', the
  `mvptr` sub-section's MvptrConfig fields on top, `dtype` (parsed), `remat`."""
  variants = {"tiny": MvptrConfig.tiny, "base": MvptrConfig.base}
  if m.variant not in variants:
    raise ValueError(f"config.model.variant = {m.variant!r}: MVPTR has {list(variants)}")
  fields = {f.name for f in dataclasses.fields(MvptrConfig)} - {"dtype", "param_dtype", "remat"}
  given = dict(m.get("mvptr") or {})
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f"config.model.mvptr: unknown fields {unknown}; known: {sorted(fields)}")
  try:
    return variants[m.variant](**given, dtype=dtype, remat=bool(m.remat))
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model.mvptr: {e}") from None


# Fine-tuning tasks read unmasked rows: the config's masking rates are ignored (set to 0).
FINETUNE_ROWS = {
  "mvptr_retrieval": "pairs",
  "mvptr_grounding": "grounding",
  "mvptr_vqa": "task",  # `data.mvptr.spec` is a task spec (data_pipelines/mvptr_task_sources.py)
  "mvptr_ve": "task",
}
RATES = ("word_rate", "tag_rate", "phrase_rate")


def example_spec(cfg, model_cfg: MvptrConfig) -> MvptrExampleSpec:
  """`data.mvptr`'s example lengths / masking rates + the model's table and region sizes
  (unknown keys and a too long stream A are errors naming the field); fine-tuning tasks
  (FINETUNE_ROWS) mask nothing."""
  d = dict(cfg.data.get("mvptr") or {})
  spec_fields = {f.name for f in dataclasses.fields(MvptrExampleSpec)} - set(MODEL_KEYS)
  unknown = sorted(set(d) - spec_fields - set(SOURCE_KEYS))
  if unknown:
    raise ValueError(
      f"config.data.mvptr: unknown keys {unknown}; known: {sorted(spec_fields | set(SOURCE_KEYS))}"
    )
  given = {k: v for k, v in d.items() if k in spec_fields}
  if str(cfg.get("task", "")) in FINETUNE_ROWS:
    given.update({k: 0.0 for k in RATES})
  spec = MvptrExampleSpec(**given, **{k: getattr(model_cfg, k) for k in MODEL_KEYS})
  length = spec.max_tokens + spec.max_phrases
  if length > model_cfg.max_positions:
    raise ValueError(
      f"config.data.mvptr.max_tokens + max_phrases = {length} exceeds the model's "
      f"max_positions {model_cfg.max_positions} (config.model.mvptr.max_positions)"
    )
  return spec


def _tokenizer(cfg) -> str:
  tokenizer = str(cfg.data.tokenizer or "minilm")
  return str(assets.minilm_dir()) if tokenizer == "minilm" else tokenizer


def eval_inputs(cfg, model_cfg: MvptrConfig) -> tuple[MvptrExampleSpec, str]:
  """(example spec, tokenizer dir) the MVPTR evaluators read their splits with
  (`EvalConfig.mvptr_inputs`): the run's lengths, nothing masked."""
  spec = example_spec(cfg, model_cfg)
  return dataclasses.replace(spec, **{k: 0.0 for k in RATES}), _tokenizer(cfg)


def streams_config(cfg, model_cfg: MvptrConfig, sizes: F.BatchSizes):
  """The MVPTR training stream: `data.mvptr` (the Oscar-layout spec file and the example
  lengths / masking rates), the tokenizer of the captions (`data.tokenizer`), the model's table
  and region sizes, the per-process batch (`sizes.image_batch`); which rows the task trains on
  (`rows`: 'pretrain' masked rows, 'pairs' unmasked, 'grounding' one row per grounded phrase,
  'task' VQA / SNLI-VE rows of a task spec)."""
  spec = example_spec(cfg, model_cfg)
  d = dict(cfg.data.get("mvptr") or {})
  if not d.get("spec"):
    raise ValueError("config.data.mvptr.spec: the dataset spec file (Oscar layout) is not set")
  return train_data.MvptrStreamsConfig(
    spec=spec,
    batch_size=sizes.image_batch,
    source={k: str(d.get(k) or "") for k in SOURCE_KEYS},
    tokenizer=_tokenizer(cfg),
    options={k: int(cfg.data[k]) for k in ("num_workers", "read_threads")},
    rows=FINETUNE_ROWS.get(str(cfg.get("task", "")), "pretrain"),
  )


def answer_pieces(cfg) -> tuple[tuple[int, ...], ...]:
  """The word pieces of each answer of an `mvptr_vqa` run started from a checkpoint (what its
  VQA head is initialised from, `init_mvptr.checkpoint_params`): the answers of the label file
  of `data.mvptr.spec`, through the run's tokenizer; () for every other run."""
  if str(cfg.get("task", "")) != "mvptr_vqa" or not str(cfg.init.get("checkpoint", "")):
    return ()
  from data_pipelines import mvptr_task_sources  # pylint: disable=g-import-not-at-top

  spec = str(dict(cfg.data.get("mvptr") or {}).get("spec") or "")
  if not spec:
    raise ValueError("config.data.mvptr.spec: the VQA task spec (its answer list) is not set")
  pieces = mvptr_task_sources.answer_pieces(spec, _tokenizer(cfg))
  return tuple(tuple(int(i) for i in p) for p in pieces)
