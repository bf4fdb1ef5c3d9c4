"""Initial weights of a training run and the set of "fresh" parameters (lr x lr_mult).

Sources, chosen by `InitConfig` (the config's `init` section; empty string = unused):

  nothing            every parameter from its initializer (e.g. the shapes-world demo vision)
  bert_dir           Hugging Face BERT -> text tower, fusion self-attn/FFN copies, MLM head
  beit_path          BEiT-2 weights -> vision tower; combinable with bert_dir
  official_th        an official X2-VLM `.th` (continued pre-training)
  params_dir         our own params directory (`params_io.save_params`, e.g. a run's export)

The model is always first created with every parameter born sharded on the mesh, then the
loaded arrays overwrite their slots shard by shard, so nothing is materialised whole on one
device.

How the BERT and BEiT-2 files map onto the towers:
docs/fidelity.md#initial-weights-from-bert-and-beit-2.

Fresh parameters follow the official `init_params`
(docs/fidelity.md#learning-rate-multiplier-for-fresh-parameters): from BERT/BEiT, the from-scratch
list (projections, temp, ITM/box heads, fusion cross-attention, frame embedding) plus anything
else of the BERT scope the file lacked (e.g. an MLM head); parameters the BEiT file does not
cover are *not* added, as in the official loader. From an official `.th` or our params, exactly
the parameters the file lacks (stage 2: the frame embedding). With no source at all we use the
from-scratch list too, so the heads keep their official 2x rate relative to the towers.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
from absl import logging
from flax import nnx

from x2vlm_jax import optim, treepath
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.models.x2vlm import X2VLM, create_sharded


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


def _check_exists(path: str, key: str) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"config.init.{key} = {path!r} does not exist")
  return p


def _from_official(model: X2VLM, path: str, model_cfg: ModelConfig, notes: list[str]):
  from x2vlm_jax.convert import apply, official  # pylint: disable=g-import-not-at-top
  from x2vlm_jax.convert.torch_io import load_th  # pylint: disable=g-import-not-at-top

  p = _check_exists(path, "official_th")
  if p.suffix == ".safetensors":
    from x2vlm_jax.convert.safetensors_io import load_safetensors  # pylint: disable=g-import-not-at-top

    sd, _ = load_safetensors(p)
  else:
    sd, _, read_notes = load_th(p)
    notes.extend(read_notes)
  # Missing keys are allowed (e.g. the frame embedding of stage 2,
  # docs/fidelity.md#continued-pre-training); they stay at init.
  params, report = official.official_to_params(sd, model_cfg, allow={"missing"})
  notes.append(f"official checkpoint {path}:\n{report.summary()}")
  return apply.apply_params(model, params)


def _from_params_dir(model: X2VLM, path: str, notes: list[str]):
  """Our params directory; parameters absent from it stay at init (and are fresh)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from x2vlm_jax import params_io  # pylint: disable=g-import-not-at-top

  directory = _check_exists(path, "params_dir").absolute()
  state = nnx.state(model, nnx.Param)
  ours = treepath.flatten_state(state)
  ckptr = ocp.StandardCheckpointer()
  try:
    meta = ckptr.metadata(directory / params_io.PARAMS_DIR).item_metadata
    saved = {p: m for p, m in treepath.flatten(meta)}
    unknown = sorted(set(saved) - set(ours))
    if unknown:
      raise ValueError(
        f"{path}: parameters {unknown[:10]} are not in this model "
        f"(config.model differs from the saved model_config.json?)"
      )
    bad = [
      f"{p}: saved {tuple(saved[p].shape)} vs model {tuple(ours[p][...].shape)}"
      for p in saved
      if tuple(saved[p].shape) != tuple(ours[p][...].shape)
    ]
    if bad:
      raise ValueError(f"{path}: shapes differ from the model: " + "; ".join(bad[:10]))
    # Restore straight into the model's shardings (only the saved leaves).
    flat_target = {
      p: jax.ShapeDtypeStruct(tuple(m.shape), ours[p][...].dtype, sharding=ours[p][...].sharding)
      for p, m in saved.items()
    }
    target = treepath.unflatten_like(meta, flat_target)
    restored = ckptr.restore(directory / params_io.PARAMS_DIR, target)
  finally:
    ckptr.close()
  # The restored arrays already sit in the model's shardings: write them in place (no host copy,
  # so this also works when no process can address every shard).
  flat = dict(treepath.flatten(restored))
  pure = nnx.to_pure_dict(state)
  for p, arr in flat.items():
    treepath.set_path(pure, p, arr)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  notes.append(f"params dir {path}: {len(flat)} of {len(ours)} parameters loaded")
  return frozenset(ours) - frozenset(flat)


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
    )
    if v
  ]
  if len(chosen) > 1:
    raise ValueError(f"config.init: choose one weight source, got {chosen}")
  model = create_sharded(model_cfg, mesh, key)
  notes: list[str] = []
  params_state = nnx.state(model, nnx.Param)
  scratch = optim.from_scratch_fresh_paths(params_state)
  if official_th:
    fresh = tuple(sorted(_from_official(model, official_th, model_cfg, notes)))
  elif params_dir:
    fresh = tuple(sorted(_from_params_dir(model, params_dir, notes)))
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
    fresh = tuple(sorted(set(scratch) | bert_scope_fresh))
  else:
    notes.append("no init source: every parameter from its initializer")
    fresh = scratch
  for n in notes:
    logging.info("init: %s", n)
  return InitResult(model, fresh, tuple(notes))
