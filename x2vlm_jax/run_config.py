"""The run config (an ml_collections ConfigDict) turned into the typed configs the library uses.

Every place where a config section becomes a typed object is here, so the rest of the code takes
`ModelConfig`, `OptimConfig`, `StepConfig`, `BatchSizes` and `PreprocConfig` and never reads the
ConfigDict itself. The model config is the one source of truth for the image resolution and the
patch size: batch shapes and preprocessing read them from it.

  task(cfg)                                -> the run's Task (tasks.py)
  model_config(cfg)                        -> ModelConfig, or MvptrConfig for family 'mvptr'
  init_config(cfg)                         -> InitConfig (initial weight sources)
  saved_model_config(saved)                -> ModelConfig of a run from its saved run config
  run_json(cfg, model_cfg), resume_check   -> the config saved with checkpoints; its check
  optim_config(cfg)                        -> OptimConfig
  step_config(cfg)                         -> StepConfig (what one step computes)
  batch_sizes(cfg, model_cfg, mesh, ...)   -> per-process BatchSizes of one micro-batch
  preproc_config(cfg, model_cfg)           -> PreprocConfig (training transforms)
  streams_config(cfg)                      -> StreamsConfig (training data; MVPTR: run_config_mvptr)
  loop_config(cfg)                         -> LoopConfig (steps, cadences, fault handling)
  eval_config(cfg.eval)                    -> EvalConfig (evaluators and their data)
  tokenizer_dir(cfg), resolve_dir(path)    -> where the tokenizer / BERT files are
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from data_pipelines import features as F
from x2vlm_jax import assets, ckpt_config, init_lib, objectives, optim, sharding, tasks, train_data
from x2vlm_jax import run_config_mvptr as mvptr_rc
from x2vlm_jax.evaluators import settings as eval_settings
from x2vlm_jax.models.config import ModelConfig, remat_fields
from x2vlm_jax.models.mvptr_config import MvptrConfig

# Resuming with any of these changed is a different experiment (refused unless allowed).
# `_model_resolved` is the model config after the variant table and `model.text_config_from`
# are applied (`run_json`): every field that shapes a parameter, whatever set it.
CRITICAL_KEYS = (
  "task",
  "model",
  "_model_resolved",
  "batch",
  "data.image",
  "data.region",
  "data.video",
  "data.aux",
  "train.seed",
)
# Changes here alter which examples a resumed run reads and how they are masked, not its state:
# allowed, with a warning on resume (docs/training.md#checkpoints-and-resuming).
STREAM_KEYS = ("data", "loss.aux_iter_perc")
NEUTRAL_KEYS = ("data.num_workers", "data.worker_buffer_size", "data.read_threads")
# How the step computes, not what (same numbers up to rounding): free to change on resume, and
# absent from the configs of runs saved before they existed.
_HOW = ("attention", "remat_policy", "scan_unroll", "remat_vision", "remat_text", "remat_fusion")
FREE_KEYS = tuple(f"{s}.{k}" for s in ("model", "_model_resolved") for k in _HOW)


def resolve_dir(path: str) -> str:
  """'minilm' -> the packaged MiniLM directory; anything else unchanged."""
  return str(assets.minilm_dir()) if path == "minilm" else path


family = mvptr_rc.family  # config.model.family: 'x2vlm' | 'mvptr'


def _dtype(m):
  try:
    return jnp.dtype(m.dtype).type
  except TypeError as e:
    raise ValueError(f"config.model.dtype {m.dtype!r} is not a dtype name") from e


def model_config(cfg) -> ModelConfig | MvptrConfig:
  """ModelConfig from the config's `model` section (variant + overrides); MvptrConfig for the
  family 'mvptr'."""
  m = cfg.model
  if family(cfg) == "mvptr":
    return mvptr_rc.model_config(m, _dtype(m))
  dtype = _dtype(m)
  base = ModelConfig.named(m.variant)
  if m.text_config_from:
    # Text tower sized like a given BERT (e.g. the demo's MiniLM); the fusion layers take the
    # BERT's heads and FFN width so they can start as copies of its last layers
    # (docs/fidelity.md#initial-weights-from-bert-and-beit-2).
    from x2vlm_jax.convert.hf import text_config_from_hf  # pylint: disable=g-import-not-at-top

    text = text_config_from_hf(resolve_dir(m.text_config_from))
    fusion = dataclasses.replace(base.fusion, num_heads=text.num_heads, mlp_dim=text.mlp_dim)
    base = base.replace(text=text, fusion=fusion)
  vision = dataclasses.replace(base.vision, image_size=int(m.image_res))
  if vision.image_size % vision.patch_size:
    raise ValueError(
      f"config.model.image_res {m.image_res} is not a multiple of the patch size "
      f"{vision.patch_size}"
    )
  # Saved configs of older runs lack the drop-path keys: 0, as pre-training.
  text = dataclasses.replace(base.text, drop_path_rate=float(m.get("text_drop_path", 0.0)))
  fusion = dataclasses.replace(base.fusion, drop_path_rate=float(m.get("fusion_drop_path", 0.0)))
  return base.replace(
    vision=vision,
    text=text,
    fusion=fusion,
    frame_len=int(m.frame_len),
    dtype=dtype,
    **remat_fields(bool(m.remat), str(m.get("remat_policy", ""))),  # older configs: no policy
    attention=str(m.get("attention", "einsum")),
    scan_unroll=m.get("scan_unroll", 1),  # checked by ModelConfig
    # The fine-tuning heads (absent from pre-training configs and older saved configs).
    decoder_layers=int(m.get("decoder_layers", 0)),
    cls_labels=int(m.get("cls_labels", 0)),
    cls_inputs=int(m.get("cls_inputs", 1)),
  )


def _task_data(cfg) -> dict:
  """The task's kind-specific batch fields and their sizes (BatchSizes / PreprocConfig)."""
  return {
    "task_fields": tasks.get(str(cfg.task)).fields,
    "max_answers": int(cfg.data.get("max_answers", 0)),
    "answer_tokens": int(cfg.data.get("answer_tokens", 0)),
  }


def init_config(cfg) -> init_lib.InitConfig:
  """InitConfig from the config's `init` section ('minilm' resolved to the packaged BERT).

  With `init.checkpoint`, the architecture of that run comes from the run config saved with its
  newest checkpoint (`saved_model_config`)."""
  i = cfg.init
  checkpoint = str(i.checkpoint)
  return init_lib.InitConfig(
    bert_dir=resolve_dir(i.bert_dir),
    beit_path=str(i.beit_path),
    official_th=str(i.official_th),
    params_dir=str(i.params_dir),
    checkpoint=checkpoint,
    checkpoint_model=(
      saved_model_config(init_lib.saved_run_config(checkpoint)) if checkpoint else None
    ),
    phrase_words=str(i.get("phrase_words", "")),
    qa_answer_pieces=mvptr_rc.answer_pieces(cfg),
  )


def saved_model_config(saved: Mapping) -> ModelConfig | MvptrConfig:
  """The ModelConfig of a run from the run config saved with its checkpoints (a JSON dict, as
  `CheckpointManager.saved_config()` returns it): its `model` section through `model_config`."""
  model = saved.get("model")
  if not isinstance(model, Mapping):
    raise ValueError("the checkpoint's saved run config has no `model` section")
  try:
    return model_config(ml_collections.ConfigDict({"model": dict(model)}))
  except (AttributeError, KeyError) as e:
    raise ValueError(f"the checkpoint's saved `model` section {dict(model)} is incomplete") from e


def run_json(cfg, model_cfg: ModelConfig) -> dict:
  """The run config as checkpoints store it: the config as JSON plus `_model_resolved`."""
  out = ckpt_config.to_jsonable(cfg)
  out["_model_resolved"] = ckpt_config.to_jsonable(model_cfg)
  return out


def resume_check(run: Mapping, allow_config_change: bool) -> ckpt_config.ConfigCheck:
  """The check of a checkpoint's saved config against `run` (`run_json`) before a resume."""
  return ckpt_config.ConfigCheck(
    run, CRITICAL_KEYS, STREAM_KEYS, NEUTRAL_KEYS, allow_config_change, free_keys=FREE_KEYS
  )


def optim_config(cfg) -> optim.OptimConfig:
  """OptimConfig from the config's `optim` section (unknown fields are an error there)."""
  return optim.OptimConfig(**cfg.optim.to_dict())


def task(cfg) -> tasks.Task:
  """The run's task (`config.task`), checked against the configured batch kinds."""
  t = tasks.get(str(cfg.task))
  mvptr_rc.check_task_family(t, cfg)
  t.check_batch({k: int(cfg.batch[k]) for k in F.KINDS})
  return t


def step_config(cfg) -> objectives.StepConfig:
  """StepConfig from the config's `loss` section and the task's objectives."""
  t = task(cfg)
  return objectives.StepConfig(
    iter_perc=dict(cfg.loss.iter_perc.to_dict()),
    term_weights=dict(cfg.loss.term_weights.to_dict()),
    neg_shards=int(cfg.loss.neg_shards),
    itc_grad_world_size=int(cfg.loss.itc_grad_world_size),
    objectives=t.objectives,
    image_ids=t.image_ids,
    label_smoothing=float(cfg.loss.get("label_smoothing", 0.1)),
    mvptr=dict(cfg.loss.get("mvptr") or {}) if t.family == "mvptr" else None,
  )


def _per_process(name: str, value: int, process_count: int, shards: int, accum: int) -> int:
  """One kind's per-process size of one micro-batch, from its global per-update size."""
  if value < 0:
    raise ValueError(f"config.batch.{name} must be >= 0, got {value}")
  if value % accum:
    raise ValueError(
      f"config.batch.{name} = {value} (global, per update) is not divisible by "
      f"config.train.accum_steps = {accum} micro-batches"
    )
  micro = value // accum
  where = (
    f"config.batch.{name} = {value} (global, per update) gives {micro} per micro-batch"
    if accum > 1
    else f"config.batch.{name} = {value} (global)"
  )
  if micro % process_count:
    raise ValueError(f"{where}, which is not divisible by the {process_count} processes")
  if micro % shards:
    raise ValueError(
      f"{where}, which is not divisible by the {shards} batch shards (mesh data x fsdp)"
    )
  return micro // process_count


def batch_sizes(
  cfg, model_cfg: ModelConfig | MvptrConfig, mesh: Mesh, process_count: int, accum_steps: int = 1
) -> F.BatchSizes:
  """Per-process BatchSizes of one micro-batch from the config's GLOBAL per-update sizes.

  With gradient accumulation each of the `accum_steps` micro-batches holds 1/accum_steps of
  the global sizes. Errors name the offending field and the value they are about.
  """
  if accum_steps < 1:
    raise ValueError(f"config.train.accum_steps must be >= 1, got {accum_steps}")
  shards = sharding.batch_shards(mesh)
  sizes = {}
  for name, field in (
    ("image", "image_batch"),
    ("region", "region_batch"),
    ("region_max_images", "region_max_images"),
    ("video", "video_batch"),
  ):
    value = int(cfg.batch[name])
    sizes[field] = _per_process(name, value, process_count, shards, accum_steps) if value else 0
  if sizes["region_batch"] and not sizes["region_max_images"]:
    raise ValueError("config.batch.region > 0 needs config.batch.region_max_images > 0")
  if not any(sizes[f] for f in ("image_batch", "region_batch", "video_batch")):
    raise ValueError("config.batch: every kind has batch size 0; nothing to train on")
  # MVPTR batches carry region features, not pixels: no image resolution.
  vision = getattr(model_cfg, "vision", None)
  return F.BatchSizes(
    image_res=vision.image_size if vision else 0,
    patch_size=vision.patch_size if vision else 1,
    max_tokens=int(cfg.data.max_tokens),
    max_masks=int(cfg.data.max_masks),
    frame_len=int(cfg.batch.frame_len),
    **sizes,
    **_task_data(cfg),
  )


def preproc_config(cfg, model_cfg: ModelConfig) -> F.PreprocConfig:
  """PreprocConfig (training transforms) from the config's `data` section and the model."""
  d = cfg.data
  return F.PreprocConfig(
    image_res=model_cfg.vision.image_size,
    patch_size=model_cfg.vision.patch_size,
    max_tokens=int(d.max_tokens),
    max_masks=int(d.max_masks),
    mask_prob=float(d.mask_prob),
    skipgram_prb=float(d.skipgram_prb),
    skipgram_size=int(d.skipgram_size),
    mask_whole_word=bool(d.mask_whole_word),
    min_perc_in_image=float(d.min_perc_in_image),
    max_regions=int(d.max_regions),
    frame_len=int(cfg.batch.frame_len),
    randaugment=bool(d.randaugment),
    crop_scale=tuple(float(x) for x in d.crop_scale),
    careful_hflip=bool(d.careful_hflip),
    hflip=bool(d.hflip),
    exact_boxes=bool(d.exact_boxes),
    train=True,
    caption_prompt=str(d.get("caption_prompt", "a picture of")),
    **_task_data(cfg),
  )


def streams_config(cfg) -> train_data.StreamsConfig:
  """The training data streams from `data` (sources, aux sources, reader options) and
  `loss.aux_iter_perc`; aux sources that would never be drawn are an error."""
  d = cfg.data
  sources = {k: tuple(dict(s) for s in d[k]) for k in F.KINDS if d.get(k)}
  aux_sources, aux_prob = {}, {}
  for kind in d.aux.keys():
    entries = tuple(dict(s) for s in d.aux[kind])
    p = float(cfg.loss.aux_iter_perc.get(kind, 0.0))
    if not entries or not int(cfg.batch[kind]):
      continue
    if p <= 0:
      raise ValueError(
        f"config.data.aux.{kind} has sources but loss.aux_iter_perc.{kind} is "
        f"{p}: the aux stream would never be used"
      )
    if p > 1:
      raise ValueError(f"config.loss.aux_iter_perc.{kind} = {p} must be in (0, 1]")
    aux_sources[kind], aux_prob[kind] = entries, p
  options = {
    "num_workers": int(d.num_workers),
    "worker_buffer_size": int(d.worker_buffer_size),
    "read_threads": int(d.read_threads),
  }
  return train_data.StreamsConfig(sources, aux_sources, aux_prob, options)


def _splits(name: str, data) -> eval_settings.Splits:
  """`data` of an evaluator: a list of source entries (one unnamed split), a single entry, or a
  dict split name -> list of entries."""
  if isinstance(data, Mapping) and "type" not in data:
    splits = [(str(k), v) for k, v in data.items()]
  else:
    splits = [("", data)]
  out = []
  for split, entries in splits:
    if isinstance(entries, Mapping):  # a single source given without a list
      entries = [entries]
    if not entries:
      where = f"eval.{name}.data" + (f".{split}" if split else "")
      raise ValueError(f"{where}: no sources configured for the {name} evaluator")
    out.append((split, tuple(dict(e) for e in entries)))
  return tuple(out)


def eval_config(section) -> eval_settings.EvalConfig:
  """EvalConfig from the `eval` section (a ConfigDict or a mapping): `evaluators` names what
  runs, each with its sub-section; unknown names or keys and missing data are errors."""
  sec = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  # `--config.eval.evaluators=retrieval,grounding` arrives as one string in a tuple.
  raw = sec.get("evaluators") or ()
  names = tuple(n.strip() for x in ((raw,) if isinstance(raw, str) else raw) for n in x.split(","))
  names = tuple(n for n in names if n)
  known = eval_settings.EVALUATORS
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"eval.evaluators: unknown {unknown}; known evaluators are {list(known)}")
  chosen = {}
  for name in names:
    settings_cls = known[name]
    fields = {f.name for f in dataclasses.fields(settings_cls)}
    given = dict(sec.get(name) or {})
    bad = set(given) - fields
    if bad:
      raise ValueError(f"eval.{name}: unknown keys {sorted(bad)}; expected {sorted(fields)}")
    data = _splits(name, given.pop("data", None) or [])
    kind = given.pop("kind", None)
    if kind is not None and kind not in (F.IMAGE, F.VIDEO):
      raise ValueError(f"eval.{name}.kind = {kind!r}: expected 'image' or 'video'")
    extra = {"kind": kind} if kind else {}
    types = {f.name: f.type for f in dataclasses.fields(settings_cls)}
    conv = {"str": str, "float": float, "bool": bool}  # every other setting is an int
    given = {k: conv.get(str(types[k]), int)(v) for k, v in given.items()}
    chosen[name] = settings_cls(data=data, **extra, **given)
  return eval_settings.EvalConfig(batch_size=int(sec.get("batch_size", 32)), **chosen)


def tokenizer_dir(cfg) -> str:
  """The tokenizer directory: data.tokenizer, else init.bert_dir ('minilm' resolved)."""
  path = cfg.data.tokenizer or cfg.init.bert_dir
  if not path:
    raise ValueError(
      "config.data.tokenizer is empty and there is no config.init.bert_dir to "
      "take the tokenizer from"
    )
  return resolve_dir(path)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """What the training loop reads from the config's `train` and `loss` sections."""

  total_steps: int
  stop_after: int  # end the run (saving) after this step; -1 = run to total_steps
  seed: int
  accum_steps: int
  log_every: int
  ckpt_every: int
  keep: int
  keep_every: int  # 0 = none kept forever
  async_checkpoint: bool
  eval_every: int  # 0 = no periodic evaluation
  max_consecutive_nonfinite: int
  export_at_end: bool
  profile_steps: tuple[int, int] | None  # trace steps [first, last)
  peak_tflops: float
  compilation_cache_dir: str
  log_example_ids: bool
  itm: bool  # loss.itm
  stop_calc_itm: int  # ITM only before this step; -1 = always
  select_metric: str  # evaluation metric whose best value keeps `best/params` ('' = none)
  select_mode: str  # 'max' or 'min'
  fast_compile: bool = False  # CPU: XLA's cheap backend options for the step (step_jit)


def parse_profile_steps(text: str) -> tuple[int, int] | None:
  """'10,15' -> (10, 15): trace steps [10, 15); '' -> None."""
  if not text:
    return None
  parts = [p for p in str(text).split(",") if p.strip()]
  if len(parts) != 2:
    raise ValueError(f"profile_steps {text!r}: expected 'first,last' (e.g. '10,15')")
  first, last = (int(p) for p in parts)
  if not 0 <= first < last:
    raise ValueError(f"profile_steps {text!r}: need 0 <= first < last")
  return first, last


def loop_config(cfg, profile_steps: str = "") -> LoopConfig:
  """LoopConfig from `train` and `loss`; `profile_steps` (a flag) overrides the config's."""
  t = cfg.train
  return LoopConfig(
    total_steps=int(t.total_steps),
    stop_after=int(t.stop_after),
    seed=int(t.seed),
    accum_steps=int(t.accum_steps),
    log_every=int(t.log_every),
    ckpt_every=int(t.ckpt_every),
    keep=int(t.keep),
    keep_every=int(t.keep_every),
    async_checkpoint=bool(t.async_checkpoint),
    eval_every=int(t.eval_every),
    max_consecutive_nonfinite=int(t.max_consecutive_nonfinite),
    export_at_end=bool(t.export_at_end),
    profile_steps=parse_profile_steps(profile_steps or t.profile_steps),
    peak_tflops=float(t.peak_tflops),
    compilation_cache_dir=str(t.compilation_cache_dir),
    log_example_ids=bool(t.log_example_ids),
    itm=bool(cfg.loss.itm),
    stop_calc_itm=int(cfg.loss.stop_calc_itm),
    select_metric=str(t.select_metric),
    select_mode=_select_mode(str(t.select_mode)),
    fast_compile=bool(t.get("fast_compile", False)),
  )


def _select_mode(mode: str) -> str:
  if mode not in ("max", "min"):
    raise ValueError(f"config.train.select_mode = {mode!r}: expected 'max' or 'min'")
  return mode
