"""Whole-model weights saved for one configuration, adapted to a model of another resolution or
frame count (fine-tuning initialisation, docs/conversion.md#fine-tuning-initialisation).

Every source that holds a whole X2-VLM (an official `.th`, our params directory, a training
checkpoint) first yields our nested parameters for the configuration it was saved with (the
*source*); `adapt_params` turns them into parameters of the model being built (the
*destination*):

  vision.blocks.attn.rel_pos_bias  every block's table resized from the source patch grid to the
                                   destination's (docs/fidelity.md#relative-position-bias-resize)
  frame_embed                      the first min(F_src, F_dst) rows copied; with more frames the
                                   other rows keep the destination's initial values; the whole
                                   parameter is fresh (docs/fidelity.md#video-frame-embedding)
  a head the destination lacks     dropped (`DROPPABLE`, e.g. a frame embedding into an image
                                   model), with a note
  any other shape difference       an error naming every such parameter

Destination parameters the source lacks are fresh too (they keep their initial values).
`official_params` is the same for an official state dict, whose source configuration is read
off its tables. Pure NumPy, except that jax arrays sharded over several processes are gathered
(they are small: tables and frame embeddings only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from x2vlm_jax import treepath
from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import official as O
from x2vlm_jax.convert.arrays import to_numpy
from x2vlm_jax.models.config import ModelConfig

REL_POS = "vision.blocks.attn.rel_pos_bias"
FRAME_EMBED = "frame_embed"
# Top-level parameters a destination model may lack (task models without a head, an image model
# from a video checkpoint); source values there are dropped. Tower parameters never are.
DROPPABLE = (
  "frame_embed",
  "mlm_head",
  "itm_head",
  "box_head",
  "vision_proj",
  "text_proj",
  "temp",
  "text_decoder",
  "cls_head",
)
DECODER = "text_decoder"

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `adapt_params` does with each parameter, decided from shapes alone."""

  keep: tuple[str, ...]  # same shape in source and destination
  resize: tuple[str, ...]  # rel-pos tables, frame embedding
  drop: tuple[str, ...]  # source parameters the destination does not have (heads only)
  missing: tuple[str, ...]  # destination parameters the source does not have


def plan_adaptation(src_shapes: Mapping[str, Shape], src_cfg: ModelConfig, dst_cfg: ModelConfig):
  """The `Plan` for source parameters of these shapes ({dotted path: shape}).

  Raises `common.ConversionError` naming every parameter that cannot be adapted.
  """
  dst = {p: tuple(s) for p, (s, _) in treepath.flatten_dict(O.param_shapes(dst_cfg)).items()}
  keep, resize, drop, errors = [], [], [], []
  for path, shape in src_shapes.items():
    shape = tuple(shape)
    if path not in dst:
      if path.split(".")[0] in DROPPABLE:
        drop.append(path)
      else:
        errors.append(f"{path}: not a parameter of the destination model")
    elif shape == dst[path]:
      keep.append(path)
    elif path == REL_POS:
      errors += _rel_pos_errors(shape, dst[path], src_cfg, dst_cfg)
      resize.append(path)
    elif path == FRAME_EMBED and shape[1:] == dst[path][1:] and len(shape) == 2:
      resize.append(path)
    else:
      hint = (
        " (an absolute position embedding is not resized, docs/conversion.md#resolution-change)"
        if path == "vision.pos_embed"
        else ""
      )
      errors.append(f"{path}: source shape {shape} vs destination {dst[path]}{hint}")
  if errors:
    raise C.ConversionError(
      "cannot adapt the source parameters to this model (only the relative-position tables and "
      "the frame embedding change shape):\n  " + "\n  ".join(errors)
    )
  missing = tuple(p for p in dst if p not in src_shapes)
  return Plan(tuple(keep), tuple(resize), tuple(drop), missing)


def _rel_pos_errors(shape, dst_shape, src_cfg: ModelConfig, dst_cfg: ModelConfig) -> list[str]:
  sv, dv = src_cfg.vision, dst_cfg.vision
  want = (dst_shape[0], sv.num_rel, dst_shape[2])
  if sv.patch_size != dv.patch_size:
    return [f"{REL_POS}: patch size {sv.patch_size} vs {dv.patch_size} cannot be adapted"]
  if shape != want:
    return [
      f"{REL_POS}: source shape {shape} does not fit the source config (image size "
      f"{sv.image_size}: {want}) and the destination {dst_shape}"
    ]
  return []


def adapt_params(
  params: Mapping[str, Any],
  src_cfg: ModelConfig,
  dst_cfg: ModelConfig,
  init: Callable[[str], Any] | None = None,
) -> tuple[dict[str, Any], list[str], tuple[str, ...]]:
  """(params for `dst_cfg`, notes, fresh parameter paths) from params saved for `src_cfg`.

  params: nested (or flat dotted) dict of arrays -- numpy or jax, or anything with `.shape` for
    parameters kept as they are (they are passed through untouched, e.g. arrays already in
    their shardings); the source may lack parameters (they become fresh).
  init: the destination's initial value of a parameter path; needed only when the frame
    embedding grows (its new rows keep their initial values).
  Returns nested params holding every kept and adapted parameter (dropped ones left out); the
  fresh paths are the destination parameters the source lacks plus an adapted frame embedding.
  """
  flat = treepath.flatten_dict(params)
  plan = plan_adaptation({p: tuple(v.shape) for p, v in flat.items()}, src_cfg, dst_cfg)
  out = {p: flat[p] for p in plan.keep}
  notes = [f"{p}: dropped (the destination model has no such parameter)" for p in plan.drop]
  if any(p.startswith(DECODER + ".") for p in plan.missing) and not any(
    p.startswith(DECODER + ".") for p in flat
  ):
    decoder, note = decoder_from_encoder(flat, src_cfg, dst_cfg)
    out.update(decoder)
    notes.append(note)
  for path in plan.resize:
    if path == REL_POS:
      out[path], note = resize_rel_pos_tables(
        to_host(flat[path]), src_cfg.vision.grid, dst_cfg.vision.grid
      )
    else:
      dst_frames = dst_cfg.frame_len
      dst_init = None
      if dst_frames > flat[path].shape[0]:
        if init is None:
          raise ValueError(f"{path}: growing the frame embedding needs the destination's init")
        dst_init = to_host(init(path))
      out[path], note = resize_frame_embed(to_host(flat[path]), dst_frames, dst_init)
    notes.append(note)
  fresh = (set(plan.missing) - set(out)) | ({FRAME_EMBED} & set(plan.resize))
  return treepath.unflatten_dict(out), notes, tuple(sorted(fresh))


def decoder_from_encoder(flat: Mapping[str, Any], src_cfg: ModelConfig, dst_cfg: ModelConfig):
  """({decoder path: array}, note): the official initialisation of a VQA answer decoder the
  source lacks (`XVLMForVQA.load_pretrained`, docs/finetuning.md#vqa-v2): decoder layer k <-
  fusion layer k (with half as many decoder layers, fusion layer 2k + 1), its embeddings <- the
  text embeddings, its MLM head <- the MLM head (when the source has one). The cross-attention
  keys / values are copied only when the vision width equals the text width (they read question
  states); otherwise they keep their initial values, as in the official code."""
  n_dec, n_fus = dst_cfg.decoder_layers, src_cfg.fusion.depth
  if n_dec not in (n_fus, n_fus // 2) or n_dec < 1:
    raise C.ConversionError(
      f"{DECODER}: {n_dec} decoder layers cannot be initialised from {n_fus} fusion layers "
      "(the official code supports the fusion depth or half of it)"
    )
  pick = slice(None) if n_dec == n_fus else slice(1, None, 2)
  same_width = src_cfg.vision.width == dst_cfg.text.width
  prefixes = {"fusion.layers.": "layers.", "text.embeddings.": "embeddings.", "mlm_head.": ""}
  out = {}
  for path, arr in flat.items():
    for src, dst in prefixes.items():
      if not path.startswith(src):
        continue
      rest = path[len(src) :]
      if src == "fusion.layers." and rest.startswith(("cross_attn.key.", "cross_attn.value.")):
        if not same_width:
          continue
      value = arr[pick] if src == "fusion.layers." else arr
      out[f"{DECODER}.{dst}{'mlm_head.' if src == 'mlm_head.' else ''}{rest}"] = _copy(value)
  layers = "all" if n_dec == n_fus else "the odd"
  note = (
    f"{DECODER}: initialised from {layers} fusion layers, the text embeddings"
    + (" and the MLM head" if any(p.startswith("mlm_head.") for p in flat) else "")
    + ("" if same_width else "; cross-attention keys / values fresh (vision width != text width)")
  )
  return out, note


def _copy(x: Any) -> Any:
  """A copy that owns its buffer (the train step donates every parameter: two parameters must
  never share one)."""
  import jax  # pylint: disable=g-import-not-at-top

  if isinstance(x, jax.Array):
    return jax.numpy.copy(x)
  return np.array(x)


def resize_rel_pos_tables(tables: np.ndarray, src_grid: int, dst_grid: int):
  """([depth, rows_dst, H] tables, note) from [depth, rows_src, H]: every block's table resized
  with `models.vision.resize_rel_pos_bias` (docs/fidelity.md#relative-position-bias-resize)."""
  from x2vlm_jax.models.vision import resize_rel_pos_bias  # pylint: disable=g-import-not-at-top

  new = np.stack([resize_rel_pos_bias(t, src_grid, dst_grid) for t in tables]).astype(tables.dtype)
  note = (
    f"{REL_POS}: {tables.shape[0]} tables resized {tables.shape[1:]} -> {new.shape[1:]} "
    f"(patch grid {src_grid} -> {dst_grid})"
  )
  return new, note


def resize_frame_embed(src: np.ndarray, frames: int, dst_init: np.ndarray | None = None):
  """([frames, D] frame embedding, note) from a source [F_src, D] embedding, as the official
  loader: rows [0, min(F_src, frames)) come from the source, any others from `dst_init` (the
  destination's initial values, [frames, D]; needed only when frames > F_src)."""
  n = min(src.shape[0], frames)
  if frames > n:
    if dst_init is None or tuple(dst_init.shape) != (frames, src.shape[1]):
      raise ValueError(f"{FRAME_EMBED}: {frames} rows need the destination's [frames, D] init")
    out = np.array(dst_init, dtype=src.dtype)
    out[:n] = src[:n]
  else:
    out = np.array(src[:frames])
  parts = [f"rows 0-{n - 1} copied"]
  if frames > n:
    parts.append(f"rows {n}-{frames - 1} keep their initial values")
  if src.shape[0] > n:
    parts.append(f"source rows {n}-{src.shape[0] - 1} dropped")
  note = (
    f"{FRAME_EMBED}: {src.shape[0]} -> {frames} frames: {', '.join(parts)}; "
    "the whole parameter is fresh (lr x lr_mult)"
  )
  return out, note


def to_host(x: Any) -> np.ndarray:
  """A numpy copy of an array; a jax array sharded over several processes is gathered (every
  process must call this for the same array)."""
  import jax  # pylint: disable=g-import-not-at-top

  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# ---------------------------------------------------------------------------------------------
# Official state dicts.
# ---------------------------------------------------------------------------------------------


def official_source_config(sd: Mapping[str, Any], cfg: ModelConfig) -> ModelConfig:
  """`cfg` at the resolution and frame count an official state dict was saved with: the image
  size from its rel-pos tables' rows ((2P-1)^2 + 3), the frame count from its
  `absolute_frame_pos_embed` (1, F, 1, D), 0 without one. Everything else is `cfg`'s (a
  difference there is a shape mismatch on import)."""
  v = cfg.vision
  rows = next(
    (np.shape(val)[0] for k, val in sd.items() if k.endswith("attn.relative_position_bias_table")),
    None,
  )
  size = v.image_size
  if rows is not None:
    side = round(float(rows - 3) ** 0.5)
    if side * side != rows - 3 or side % 2 == 0:
      raise C.ConversionError(f"a relative_position_bias_table has {rows} rows, not (2P-1)^2 + 3")
    size = (side + 1) // 2 * v.patch_size
  frames = sd.get("absolute_frame_pos_embed")
  frame_len = int(np.shape(frames)[1]) if frames is not None and np.ndim(frames) == 4 else 0
  return cfg.replace(
    vision=dataclasses.replace(v, image_size=size), frame_len=frame_len, **_task_heads_of(sd, cfg)
  )


def _task_heads_of(sd: Mapping[str, Any], cfg: ModelConfig) -> dict[str, int]:
  """The fine-tuning heads an official state dict holds: decoder layers (`text_decoder.*`)
  and the `cls_head` size (its classes and how many fused [CLS] vectors it reads)."""
  prefix = "text_decoder.bert.encoder.layer."
  layers = {k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)}
  out = {"decoder_layers": len(layers), "cls_labels": 0, "cls_inputs": 1}
  fc1, fc2 = sd.get("cls_head.0.weight"), sd.get("cls_head.3.weight")
  if fc1 is not None and fc2 is not None:
    out["cls_labels"] = int(np.shape(fc2)[0])
    out["cls_inputs"] = max(1, int(np.shape(fc1)[1]) // cfg.text.width)
  return out


def official_params(
  state_dict: Mapping[str, Any], cfg: ModelConfig, init: Callable[[str], Any] | None = None
) -> tuple[dict[str, Any], C.CoverageReport, tuple[str, ...]]:
  """(params for `cfg`, coverage report, fresh paths) from an official state dict of any
  resolution and frame count, pre-training or fine-tuning layout (`bert.` / `roberta.` or
  neither; docs/fidelity.md#fine-tuning-layout).

  The file is imported strictly for its own configuration (`official_source_config`): an entry
  no rule takes, a wrong shape, a wrong buffer or a differing tied copy is an error; parameters
  it lacks are reported missing and become fresh, except missing layers of a stacked tower (a
  model deeper than the file), which are an error. Then `adapt_params` (notes in the report).
  """
  sd = {k: to_numpy(val, k) for k, val in state_dict.items()}
  src_cfg = official_source_config(sd, cfg)
  params, report = O.official_to_params(sd, src_cfg, allow={"missing"})
  layers = [m for m in report.missing if "[" in m]
  if layers:
    raise C.ConversionError(
      f"the checkpoint lacks layers of stacked parameters: {layers[:10]}"
      + (f" (+{len(layers) - 10} more)" if len(layers) > 10 else "")
      + " (is the model deeper than the checkpoint?)",
      report,
    )
  params, notes, fresh = adapt_params(params, src_cfg, cfg, init)
  report.notes.extend(notes)
  return params, report, fresh
