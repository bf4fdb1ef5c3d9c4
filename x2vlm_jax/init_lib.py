"""Initial weights of a training run and the set of "fresh" parameters (lr x lr_mult).

Sources, chosen by `InitConfig` (the config's `init` section; empty string = unused):

  nothing            every parameter from its initializer (e.g. the shapes-world demo vision)
  bert_dir           Hugging Face BERT -> text tower, fusion self-attn/FFN copies, MLM head
  beit_path          BEiT-2 weights -> vision tower; combinable with bert_dir
  official_th        an official X2-VLM `.th` or `.safetensors` (continued pre-training,
                     fine-tuning; pre-training or fine-tuning key layout)
  params_dir         our own params directory (`params_io.save_params`, e.g. a run's export)
  checkpoint         a training run's workdir or its checkpoints directory: the parameters of its
                     newest good checkpoint (never the optimizer state)

The last three hold a whole model saved for some configuration (read from the file's tables, the
directory's `model_config.json`, the checkpoint's saved run config); `convert.adapt.adapt_params`
fits it to the model built here: relative-position tables resized to its resolution, the frame
embedding cut or extended to its frame count, heads it lacks dropped, any other shape difference
an error (docs/conversion.md#fine-tuning-initialisation).

The model is always first created with every parameter born sharded on the mesh, then the
loaded arrays overwrite their slots shard by shard, so nothing is materialised whole on one
device.

How the BERT and BEiT-2 files map onto the towers:
docs/fidelity.md#initial-weights-from-bert-and-beit-2.

Fresh parameters follow the official `init_params`
(docs/fidelity.md#learning-rate-multiplier-for-fresh-parameters): from BERT/BEiT, the from-scratch
list (projections, temp, ITM/box heads, fusion cross-attention, frame embedding) plus anything
else of the BERT scope the file lacked (e.g. an MLM head); parameters the BEiT file does not
cover are *not* added, as in the official loader. From a whole model (official `.th`, our params,
a checkpoint), exactly the parameters the source lacks (stage 2: the frame embedding; the MLM head
of a fine-tuning-layout file) plus a frame embedding of another frame count. With no source at
all we use the from-scratch list too, so the heads keep their official 2x rate relative to the
towers.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging
from etils import epath
from flax import nnx

from x2vlm_jax import optim, paths, treepath
from x2vlm_jax.models import family
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.models.x2vlm import X2VLM


@dataclasses.dataclass(frozen=True)
class InitResult:
  """The initialised model, the fresh parameter paths and a human-readable account."""

  model: X2VLM
  fresh_paths: tuple[str, ...]
  notes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """Where the initial weights come from (empty string = unused; at most one source, except
  that bert_dir and beit_path combine). Built from the config by `run_config.init_config`."""

  bert_dir: str = ""
  beit_path: str = ""
  official_th: str = ""
  params_dir: str = ""
  checkpoint: str = ""  # a training workdir or its checkpoints directory
  # The architecture the checkpoint was trained with (needed with `checkpoint`;
  # `run_config.init_config` builds it from the checkpoint's saved run config).
  checkpoint_model: ModelConfig | None = None
  # MVPTR with bert_dir: JSON {phrase id: word-piece ids} for the phrase rows (init_mvptr.py).
  phrase_words: str = ""
  # MVPTR VQA from a pre-training checkpoint: each answer's word pieces, whose MLM rows the VQA
  # head starts from (`run_config_mvptr.answer_pieces`; init_mvptr.py).
  qa_answer_pieces: tuple[tuple[int, ...], ...] = ()


def _check_exists(path: str, key: str) -> epath.Path:
  p = paths.path(path)
  if not p.exists():
    raise FileNotFoundError(f"config.init.{key} = {path!r} does not exist")
  return p


def checkpoint_dir(path: str | os.PathLike) -> epath.Path:
  """The directory of committed checkpoint steps: `path/checkpoints` of a training workdir, or
  `path` itself when it holds the steps."""
  from x2vlm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  p = _check_exists(str(path), "checkpoint")
  for cand in (p / ckpt_lib.CKPT_DIR, p):
    if cand.is_dir() and any(c.name.isdigit() for c in cand.iterdir()):
      return cand
  raise FileNotFoundError(
    f"config.init.checkpoint = {str(path)!r}: neither a training workdir nor a checkpoints "
    "directory with committed steps"
  )


def saved_run_config(path: str | os.PathLike) -> dict:
  """The run config (JSON dict) saved with the newest checkpoint of a workdir / checkpoints dir;
  `run_config.saved_model_config` turns its `model` section into the run's ModelConfig."""
  from x2vlm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  with ckpt_lib.CheckpointManager(checkpoint_dir(path), read_only=True) as manager:
    return manager.saved_config()


def _init_values(model: X2VLM):
  """The model's current (initial) value of a parameter path, on the host."""
  from x2vlm_jax.convert import adapt  # pylint: disable=g-import-not-at-top

  ours = treepath.flatten_state(nnx.state(model, nnx.Param))
  return lambda path: adapt.to_host(ours[path][...])


def _load(model: X2VLM, params, src_cfg: ModelConfig, notes: list[str]) -> frozenset[str]:
  """Adapts a whole source model's params to `model` and writes them; returns the fresh paths."""
  from x2vlm_jax.convert import adapt, apply  # pylint: disable=g-import-not-at-top

  params, adapt_notes, fresh = adapt.adapt_params(params, src_cfg, model.cfg, _init_values(model))
  notes.extend(adapt_notes)
  return apply.apply_params(model, params) | frozenset(fresh)


def _from_official(model: X2VLM, path: str, notes: list[str]) -> frozenset[str]:
  """An official `.th` / `.safetensors` of any resolution and frame count, either key layout."""
  from x2vlm_jax.convert import adapt, apply  # pylint: disable=g-import-not-at-top
  from x2vlm_jax.convert.torch_io import load_th  # pylint: disable=g-import-not-at-top

  p = _check_exists(path, "official_th")
  if p.suffix == ".safetensors":
    from x2vlm_jax.convert.safetensors_io import load_safetensors  # pylint: disable=g-import-not-at-top

    sd, _ = load_safetensors(p)
  else:
    sd, _, read_notes = load_th(p)
    notes.extend(read_notes)
  # Missing keys are allowed (the frame embedding of stage 2, the MLM head of a fine-tuning
  # layout; docs/fidelity.md#continued-pre-training); they stay at init and are fresh.
  params, report, fresh = adapt.official_params(sd, model.cfg, _init_values(model))
  notes.append(f"official checkpoint {path}:\n{report.summary()}")
  return apply.apply_params(model, params) | frozenset(fresh)


def _from_params_dir(model: X2VLM, path: str, notes: list[str]) -> frozenset[str]:
  """Our params directory, saved for the config in its `model_config.json`; parameters absent
  from it stay at init (and are fresh). Kept parameters are read straight into the model's
  shardings; only those to adapt (tables, frame embedding) come to the host."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from x2vlm_jax import params_io  # pylint: disable=g-import-not-at-top
  from x2vlm_jax.convert import adapt  # pylint: disable=g-import-not-at-top

  directory = paths.absolute(_check_exists(path, "params_dir")) / params_io.PARAMS_DIR
  src_cfg = params_io.load_config(directory.parent)
  ours = treepath.flatten_state(nnx.state(model, nnx.Param))
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    saved = dict(treepath.flatten(ckptr.metadata(directory).item_metadata.tree))
    plan = adapt.plan_adaptation({p: m.shape for p, m in saved.items()}, src_cfg, model.cfg)
    target = {p: _sds(saved[p].shape, ours[p][...]) for p in plan.keep}
    target.update({p: jax.ShapeDtypeStruct(saved[p].shape, saved[p].dtype) for p in plan.resize})
    target = treepath.unflatten_dict(target)
    restored = ckptr.restore(
      directory,
      args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
      ),
    )
  finally:
    ckptr.close()
  n = len(plan.keep) + len(plan.resize)
  notes.append(f"params dir {path}: {n} of {len(ours)} parameters loaded")
  return _load(model, restored, src_cfg, notes)


def _sds(shape, like) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), like.dtype, sharding=like.sharding)


def _from_checkpoint(model: X2VLM, init: InitConfig, mesh, notes: list[str]) -> frozenset[str]:
  """The parameters (only) of a training run's newest good checkpoint, read with the
  architecture it was trained with (`init.checkpoint_model`), then adapted."""
  from x2vlm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from x2vlm_jax import train_state  # pylint: disable=g-import-not-at-top
  from x2vlm_jax.convert import adapt  # pylint: disable=g-import-not-at-top

  src_cfg = init.checkpoint_model
  ckpt_dir = checkpoint_dir(init.checkpoint)
  src, dst = family.name(src_cfg), family.name(model.cfg)
  if src != dst:
    raise ValueError(f"config.init.checkpoint: a {src} run cannot initialise a {dst} model")
  layout = train_state.ParamLayout.build(src_cfg, mesh)
  # Fail on an architecture that cannot be adapted before reading any array. MVPTR has nothing
  # to adapt: a parameter of another shape is an error of `apply_params`, naming it.
  if dst == "x2vlm":
    adapt.plan_adaptation(
      {p: x.shape for p, x in treepath.flatten(layout.abstract())}, src_cfg, model.cfg
    )
  # Read-only: the source run may still be writing its next step.
  with ckpt_lib.CheckpointManager(ckpt_dir, read_only=True) as manager:
    params, step = train_state.restore_params(manager, layout)
  notes.append(f"checkpoint {ckpt_dir} step {step}: parameters only (no optimizer state)")
  if dst == "mvptr":
    from x2vlm_jax import init_mvptr  # pylint: disable=g-import-not-at-top

    return init_mvptr.checkpoint_params(model, params, src_cfg, notes, init.qa_answer_pieces)
  return _load(model, params, src_cfg, notes)


def _decoder_from_towers(model: X2VLM, notes: list[str]) -> set[str]:
  """A VQA decoder of a model built from BERT: initialised as the official code initialises it
  from a checkpoint (`adapt.decoder_from_encoder`: fusion layers, text embeddings, MLM head,
  here the BERT copies); its cross-attention, fresh in the fusion tower, stays fresh."""
  if model.cfg.decoder_layers == 0:
    return set()
  from x2vlm_jax.convert import adapt, apply  # pylint: disable=g-import-not-at-top

  flat = {p: v[...] for p, v in treepath.flatten_state(nnx.state(model, nnx.Param)).items()}
  decoder, note = adapt.decoder_from_encoder(flat, model.cfg, model.cfg)
  apply.apply_params(model, treepath.unflatten_dict(decoder))
  notes.append(note)
  return {"text_decoder.layers.cross_attn", "text_decoder.layers.cross_norm"}


def _initialize_mvptr(init: InitConfig, model, mesh, notes: list[str]) -> InitResult:
  """MVPTR: random, BERT as the paper states, or a checkpoint's parameters (init_mvptr.py); one
  learning rate for every parameter, so nothing is fresh."""
  from x2vlm_jax import init_mvptr  # pylint: disable=g-import-not-at-top

  if init.checkpoint:
    _from_checkpoint(model, init, mesh, notes)
  elif init.bert_dir:
    bert = str(_check_exists(init.bert_dir, "bert_dir"))
    init_mvptr.from_bert(model, bert, init.phrase_words, notes)
  else:
    notes.append("no init source: every parameter from its initializer")
  for n in notes:
    logging.info("init: %s", n)
  return InitResult(model, (), tuple(notes))


def initialize(init: InitConfig, model_cfg: ModelConfig, mesh, key) -> InitResult:
  """Creates the sharded model on `mesh` and loads the configured initial weights.

  Args:
    init: the weight sources.
    model_cfg: the architecture (`run_config.model_config`).
    mesh: the device mesh; parameters are born in their final sharding.
    key: PRNG key for the initializers.
  """
  bert, beit = init.bert_dir, init.beit_path
  official_th, params_dir = init.official_th, init.params_dir
  chosen = [
    k
    for k, v in (
      ("bert_dir/beit_path", bert or beit),
      ("official_th", official_th),
      ("params_dir", params_dir),
      ("checkpoint", init.checkpoint),
    )
    if v
  ]
  if len(chosen) > 1:
    raise ValueError(f"config.init: choose one weight source, got {chosen}")
  if init.checkpoint and init.checkpoint_model is None:
    raise ValueError(
      "InitConfig.checkpoint needs checkpoint_model, the architecture the run was trained with "
      "(run_config.init_config reads it from the checkpoint's saved config)"
    )
  mvptr = family.name(model_cfg) == "mvptr"
  for name in ("beit_path", "official_th", "params_dir"):
    if mvptr and getattr(init, name):
      raise ValueError(f"config.init.{name}: not a weight source of an MVPTR model")
  model = family.create_sharded(model_cfg, mesh, key)
  notes: list[str] = []
  if mvptr:
    return _initialize_mvptr(init, model, mesh, notes)
  params_state = nnx.state(model, nnx.Param)
  scratch = optim.from_scratch_fresh_paths(params_state)
  if official_th:
    fresh = tuple(sorted(_from_official(model, official_th, notes)))
  elif params_dir:
    fresh = tuple(sorted(_from_params_dir(model, params_dir, notes)))
  elif init.checkpoint:
    fresh = tuple(sorted(_from_checkpoint(model, init, mesh, notes)))
  elif bert or beit:
    from x2vlm_jax.convert import apply, hf, hf_beit  # pylint: disable=g-import-not-at-top

    results, bert_scope_fresh = [], set()
    if bert:
      _check_exists(bert, "bert_dir")
      res = hf.load_bert(bert, model_cfg)
      notes.append(f"BERT {bert}:\n{res.report.summary()}")
      results.append(res)
      bert_scope_fresh = set(res.not_loaded)
    if beit:
      _check_exists(beit, "beit_path")
      res = hf_beit.load_beit(beit, model_cfg)
      notes.append(f"BEiT {beit}:\n{res.report.summary()}")
      results.append(res)
    apply.apply_params(model, *(r.params for r in results))
    fresh = tuple(sorted(set(scratch) | bert_scope_fresh | _decoder_from_towers(model, notes)))
  else:
    notes.append("no init source: every parameter from its initializer")
    fresh = scratch
  for n in notes:
    logging.info("init: %s", n)
  return InitResult(model, fresh, tuple(notes))
