"""Official X2-VLM state dicts (reference §7) <-> our nested param dict (docs/architecture.md).

Three pieces, all pure NumPy:
- `official_state_spec(cfg)`: every entry of the official pre-training state dict (§7.2) for a
  config -- key, PyTorch shape and dtype, in the order `torch.save` writes them -- including the
  int64 buffers and both tied names.
- `official_rules(cfg)`: the `common.Rule` table between official keys and our paths (§7.3);
  it accepts the pre-training layout (`text_encoder.bert.*`, `text_encoder.cls.*`) and the
  fine-tuning layout (§7.4: no `bert.`, no MLM head).
- `official_to_params` / `params_to_official`: strict conversion both ways, with tied weights
  and buffers checked on import and re-created on export.

Official text layers [0, text.depth) are our `text.layers`, the next fusion.depth layers are our
`fusion.layers` (the official model keeps one 18-layer BERT, §1.1).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import transforms as T
from x2vlm_jax.convert.arrays import to_numpy, to_numpy_tree
from x2vlm_jax.models.config import ModelConfig

F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)

PRETRAIN = "pretrain"
FINETUNE = "finetune"
LAYOUTS = (PRETRAIN, FINETUNE)

# Tied entries of the pre-training layout: duplicate name -> primary name (§7.3).
TIED = {
    "text_encoder.cls.predictions.decoder.weight": "text_encoder.bert.embeddings.word_embeddings.weight",
    "text_encoder.cls.predictions.decoder.bias": "text_encoder.cls.predictions.bias",
}


# ---------------------------------------------------------------------------------------------
# Buffers (§1.2, §7.3): recomputed, never learned.
# ---------------------------------------------------------------------------------------------


def relative_position_index(grid: int) -> np.ndarray:
  """BEiT's (1+T, 1+T) int64 index into the rel-pos table for a grid of P x P patches (§1.2).

  Patch pairs index (dr + P - 1) * (2P - 1) + (dc + P - 1) with (row, col) = divmod(tok - 1, P);
  the three last table rows serve CLS->patch, patch->CLS and CLS->CLS.
  """
  p = grid
  num_rel = (2 * p - 1) ** 2 + 3
  rows, cols = np.divmod(np.arange(p * p), p)  # [T]
  dr = rows[:, None] - rows[None, :] + p - 1  # [T, T]
  dc = cols[:, None] - cols[None, :] + p - 1
  index = np.empty((p * p + 1, p * p + 1), np.int64)
  index[1:, 1:] = dr * (2 * p - 1) + dc
  index[0, 1:] = num_rel - 3
  index[1:, 0] = num_rel - 2
  index[0, 0] = num_rel - 1
  return index


def position_ids(max_positions: int) -> np.ndarray:
  """BERT's `position_ids` buffer: arange as a (1, max_positions) int64 row."""
  return np.arange(max_positions, dtype=np.int64)[None, :]


# ---------------------------------------------------------------------------------------------
# The official key list (§7.2), in file order.
# ---------------------------------------------------------------------------------------------


def _bert_prefix(layout: str) -> tuple[str, str]:
  """(prefix of BERT keys, prefix of MLM-head keys or '' when the layout has none)."""
  if layout == PRETRAIN:
    return "text_encoder.bert.", "text_encoder.cls."
  if layout == FINETUNE:
    return "text_encoder.", ""
  raise ValueError(f"unknown official layout {layout!r}; expected one of {LAYOUTS}")


def official_state_spec(cfg: ModelConfig, layout: str = PRETRAIN) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Ordered {official key: (PyTorch shape, dtype)} of every state-dict entry for `cfg`.

  Order follows `nn.Module.state_dict()` of the official `XVLM` (§7.2 "Order in the file"): own
  parameters, then own buffers, then sub-modules. The fine-tuning layout (§7.4) drops `bert.`
  and the MLM head and keeps the same heads (a task model may hold fewer; extra ones are
  reported as unexpected by the loader).
  """
  v, t, f = cfg.vision, cfg.text, cfg.fusion
  bert, cls = _bert_prefix(layout)
  spec: dict[str, tuple[tuple[int, ...], np.dtype]] = collections.OrderedDict()

  def add(key, shape, dtype=F32):
    spec[key] = (tuple(shape), np.dtype(dtype))

  if cfg.frame_len > 0:  # registered before `temp` in the official module (§7.2)
    add("absolute_frame_pos_embed", (1, cfg.frame_len, 1, v.width))
  add("temp", ())

  dv = v.width
  add("vision_encoder.cls_token", (1, 1, dv))
  if v.abs_pos_embed:  # BEiT's optional absolute position embedding (`use_abs_pos_emb`)
    add("vision_encoder.pos_embed", (1, v.num_patches + 1, dv))
  add("vision_encoder.patch_embed.proj.weight", (dv, 3, v.patch_size, v.patch_size))
  add("vision_encoder.patch_embed.proj.bias", (dv,))
  tokens = v.num_patches + 1
  for i in range(v.depth):
    b = f"vision_encoder.blocks.{i}."
    add(b + "gamma_1", (dv,))
    add(b + "gamma_2", (dv,))
    add(b + "norm1.weight", (dv,))
    add(b + "norm1.bias", (dv,))
    add(b + "attn.q_bias", (dv,))
    add(b + "attn.v_bias", (dv,))
    add(b + "attn.relative_position_bias_table", (v.num_rel, v.num_heads))
    add(b + "attn.relative_position_index", (tokens, tokens), I64)
    add(b + "attn.qkv.weight", (3 * dv, dv))
    add(b + "attn.proj.weight", (dv, dv))
    add(b + "attn.proj.bias", (dv,))
    add(b + "norm2.weight", (dv,))
    add(b + "norm2.bias", (dv,))
    add(b + "mlp.fc1.weight", (v.mlp_dim, dv))
    add(b + "mlp.fc1.bias", (v.mlp_dim,))
    add(b + "mlp.fc2.weight", (dv, v.mlp_dim))
    add(b + "mlp.fc2.bias", (dv,))
  add("vision_encoder.fc_norm.weight", (dv,))
  add("vision_encoder.fc_norm.bias", (dv,))

  dt = t.width
  e = bert + "embeddings."
  add(e + "position_ids", (1, t.max_positions), I64)
  add(e + "word_embeddings.weight", (t.vocab_size, dt))
  add(e + "position_embeddings.weight", (t.max_positions, dt))
  add(e + "token_type_embeddings.weight", (t.type_vocab_size, dt))
  add(e + "LayerNorm.weight", (dt,))
  add(e + "LayerNorm.bias", (dt,))
  for layer in range(t.depth + f.depth):
    fusion = layer >= t.depth
    mlp = f.mlp_dim if fusion else t.mlp_dim
    b = f"{bert}encoder.layer.{layer}."
    for name in ("query", "key", "value"):
      add(b + f"attention.self.{name}.weight", (dt, dt))
      add(b + f"attention.self.{name}.bias", (dt,))
    add(b + "attention.output.dense.weight", (dt, dt))
    add(b + "attention.output.dense.bias", (dt,))
    add(b + "attention.output.LayerNorm.weight", (dt,))
    add(b + "attention.output.LayerNorm.bias", (dt,))
    if fusion:
      add(b + "crossattention.self.query.weight", (dt, dt))
      add(b + "crossattention.self.query.bias", (dt,))
      for name in ("key", "value"):
        add(b + f"crossattention.self.{name}.weight", (dt, dv))
        add(b + f"crossattention.self.{name}.bias", (dt,))
      add(b + "crossattention.output.dense.weight", (dt, dt))
      add(b + "crossattention.output.dense.bias", (dt,))
      add(b + "crossattention.output.LayerNorm.weight", (dt,))
      add(b + "crossattention.output.LayerNorm.bias", (dt,))
    add(b + "intermediate.dense.weight", (mlp, dt))
    add(b + "intermediate.dense.bias", (mlp,))
    add(b + "output.dense.weight", (dt, mlp))
    add(b + "output.dense.bias", (dt,))
    add(b + "output.LayerNorm.weight", (dt,))
    add(b + "output.LayerNorm.bias", (dt,))
  if cls:
    p = cls + "predictions."
    add(p + "bias", (t.vocab_size,))  # own parameter of the LM head: listed before sub-modules
    add(p + "transform.dense.weight", (dt, dt))
    add(p + "transform.dense.bias", (dt,))
    add(p + "transform.LayerNorm.weight", (dt,))
    add(p + "transform.LayerNorm.bias", (dt,))
    add(p + "decoder.weight", (t.vocab_size, dt))  # tied to the word embeddings
    add(p + "decoder.bias", (t.vocab_size,))  # tied to predictions.bias

  add("vision_proj.weight", (cfg.embed_dim, dv))
  add("vision_proj.bias", (cfg.embed_dim,))
  add("text_proj.weight", (cfg.embed_dim, dt))
  add("text_proj.bias", (cfg.embed_dim,))
  for head, out in (("itm_head", 2), ("bbox_head", 4)):
    add(f"{head}.0.weight", (2 * dt, dt))
    add(f"{head}.0.bias", (2 * dt,))
    add(f"{head}.1.weight", (2 * dt,))
    add(f"{head}.1.bias", (2 * dt,))
    add(f"{head}.3.weight", (out, 2 * dt))
    add(f"{head}.3.bias", (out,))
  return spec


def count_parameters(spec: Mapping[str, tuple[tuple[int, ...], Any]]) -> int:
  """Learned scalars in a spec: excludes int64 buffers and the tied duplicate names."""
  total = 0
  for key, (shape, dtype) in spec.items():
    if np.dtype(dtype) == I64 or key in TIED:
      continue
    total += int(np.prod(shape, dtype=np.int64))
  return total


def detect_layout(keys: Iterable[str]) -> str:
  """'pretrain' if BERT keys carry `bert.` (masked-LM wrapper), 'finetune' otherwise (§7.4)."""
  keys = list(keys)
  if any(k.startswith("text_encoder.bert.") for k in keys):
    return PRETRAIN
  if any(k.startswith("text_encoder.") for k in keys):
    return FINETUNE
  raise ValueError("not an X2-VLM state dict: no key starts with 'text_encoder.'")


# ---------------------------------------------------------------------------------------------
# Our parameter shapes (the table of docs/architecture.md).
# ---------------------------------------------------------------------------------------------


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
  """Nested {path: (shape, dtype)} of our parameters for `cfg`, per docs/architecture.md.

  Stacked towers carry a leading layer axis. tests/test_convert_official.py checks this table
  against `nnx.eval_shape` of the real model.
  """
  v, t, f = cfg.vision, cfg.text, cfg.fusion
  dt_ = np.dtype(cfg.param_dtype)
  dv, dw = v.width, t.width
  vh, vdh = v.num_heads, v.width // v.num_heads
  th, tdh = t.num_heads, t.width // t.num_heads
  fh, fdh = f.num_heads, t.width // f.num_heads

  def s(*shape):
    return (tuple(shape), dt_)

  def norm(n, d):
    return {"scale": s(*n, d), "bias": s(*n, d)}

  def dense(n, i, o):
    return {"kernel": s(*n, i, o), "bias": s(*n, o)}

  def attn(n, heads, dh, d_q, d_kv):
    return {
        "query": {"kernel": s(*n, d_q, heads, dh), "bias": s(*n, heads, dh)},
        "key": {"kernel": s(*n, d_kv, heads, dh), "bias": s(*n, heads, dh)},
        "value": {"kernel": s(*n, d_kv, heads, dh), "bias": s(*n, heads, dh)},
        "out": {"kernel": s(*n, heads, dh, d_q), "bias": s(*n, d_q)},
    }

  nv, nt, nf = (v.depth,), (t.depth,), (f.depth,)
  tree = {
      "vision": {
          "patch_embed": {"kernel": s(v.patch_size, v.patch_size, 3, dv), "bias": s(dv)},
          "cls_token": s(1, 1, dv),
          **({"pos_embed": s(1, v.num_patches + 1, dv)} if v.abs_pos_embed else {}),
          "blocks": {
              "norm1": norm(nv, dv),
              "norm2": norm(nv, dv),
              "attn": {
                  "qkv": {"kernel": s(*nv, dv, 3, vh, vdh)},
                  "q_bias": s(*nv, vh, vdh),
                  "v_bias": s(*nv, vh, vdh),
                  "rel_pos_bias": s(*nv, v.num_rel, vh),
                  "proj": {"kernel": s(*nv, vh, vdh, dv), "bias": s(*nv, dv)},
              },
              "gamma_1": s(*nv, dv),
              "gamma_2": s(*nv, dv),
              "mlp": {"fc1": dense(nv, dv, v.mlp_dim), "fc2": dense(nv, v.mlp_dim, dv)},
          },
          "fc_norm": norm((), dv),
      },
      "text": {
          "embeddings": {
              "word": s(t.vocab_size, dw),
              "position": s(t.max_positions, dw),
              "token_type": s(t.type_vocab_size, dw),
              "norm": norm((), dw),
          },
          "layers": {
              "attn": attn(nt, th, tdh, dw, dw),
              "attn_norm": norm(nt, dw),
              "mlp_norm": norm(nt, dw),
              "mlp": {"fc1": dense(nt, dw, t.mlp_dim), "fc2": dense(nt, t.mlp_dim, dw)},
          },
      },
      "fusion": {
          "layers": {
              "self_attn": attn(nf, fh, fdh, dw, dw),
              "cross_attn": attn(nf, fh, fdh, dw, dv),
              "self_norm": norm(nf, dw),
              "cross_norm": norm(nf, dw),
              "mlp_norm": norm(nf, dw),
              "mlp": {"fc1": dense(nf, dw, f.mlp_dim), "fc2": dense(nf, f.mlp_dim, dw)},
          },
      },
      "vision_proj": dense((), dv, cfg.embed_dim),
      "text_proj": dense((), dw, cfg.embed_dim),
      "temp": s(),
      "itm_head": {"fc1": dense((), dw, 2 * dw), "norm": norm((), 2 * dw), "fc2": dense((), 2 * dw, 2)},
      "box_head": {"fc1": dense((), dw, 2 * dw), "norm": norm((), 2 * dw), "fc2": dense((), 2 * dw, 4)},
      "mlm_head": {"dense": dense((), dw, dw), "norm": norm((), dw), "bias": s(t.vocab_size)},
  }
  if cfg.frame_len > 0:
    tree["frame_embed"] = s(cfg.frame_len, dv)
  return tree


# ---------------------------------------------------------------------------------------------
# The rule table (§7.3).
# ---------------------------------------------------------------------------------------------

FRAME_EMBED = T.reshape_transform("frame_embed", lambda s: (1, s[0], 1, s[1]))
_LN = {"weight": "scale", "bias": "bias"}


def _ln_rules(foreign: str, ours: str, **kw) -> list[C.Rule]:
  return [C.Rule(foreign + r"\." + k, f"{ours}.{v}", **kw) for k, v in _LN.items()]


def _linear_rules(foreign: str, ours: str, kernel=T.LINEAR, bias=T.IDENTITY, **kw) -> list[C.Rule]:
  return [C.Rule(foreign + r"\.weight", ours + ".kernel", kernel, **kw),
          C.Rule(foreign + r"\.bias", ours + ".bias", bias, **kw)]


def official_rules(cfg: ModelConfig) -> list[C.Rule]:
  """Rules mapping official keys (pre-training or fine-tuning layout) to our paths for `cfg`."""
  v, t, f = cfg.vision, cfg.text, cfg.fusion
  grid = v.grid
  rules: list[C.Rule] = [
      C.Rule(r"absolute_frame_pos_embed", "frame_embed", FRAME_EMBED),
      C.Rule(r"temp", "temp"),
      C.Rule(r"vision_encoder\.cls_token", "vision.cls_token"),
      C.Rule(r"vision_encoder\.pos_embed", "vision.pos_embed"),
      *_linear_rules(r"vision_encoder\.patch_embed\.proj", "vision.patch_embed", T.CONV_OIHW),
      *_ln_rules(r"vision_encoder\.fc_norm", "vision.fc_norm"),
  ]
  blk = r"vision_encoder\.blocks\.(?P<layer>\d+)\."
  rng = {"layer_range": (0, v.depth)}
  rules += [
      C.Rule(blk + r"gamma_(?P<g>[12])", r"vision.blocks.gamma_\g<g>", **rng),
      *_ln_rules(blk + r"norm(?P<n>[12])", r"vision.blocks.norm\g<n>", **rng),
      C.Rule(blk + r"attn\.(?P<b>[qv])_bias", r"vision.blocks.attn.\g<b>_bias", T.BIAS_TO_HEADS, **rng),
      C.Rule(blk + r"attn\.relative_position_bias_table", "vision.blocks.attn.rel_pos_bias", **rng),
      C.Rule(blk + r"attn\.relative_position_index", None,
             expect=lambda m: relative_position_index(grid), **rng),
      C.Rule(blk + r"attn\.qkv\.weight", "vision.blocks.attn.qkv.kernel", T.FUSED_QKV, **rng),
      *_linear_rules(blk + r"attn\.proj", "vision.blocks.attn.proj", T.LINEAR_FROM_HEADS, **rng),
      *_linear_rules(blk + r"mlp\.fc(?P<fc>[12])", r"vision.blocks.mlp.fc\g<fc>", **rng),
  ]

  bert = r"text_encoder\.(?:bert\.)?"
  emb = bert + r"embeddings\."
  rules += [
      C.Rule(emb + "position_ids", None, expect=lambda m: position_ids(t.max_positions)),
      C.Rule(emb + r"word_embeddings\.weight", "text.embeddings.word"),
      C.Rule(emb + r"position_embeddings\.weight", "text.embeddings.position"),
      C.Rule(emb + r"token_type_embeddings\.weight", "text.embeddings.token_type"),
      *_ln_rules(emb + "LayerNorm", "text.embeddings.norm"),
  ]
  lay = bert + r"encoder\.layer\.(?P<layer>\d+)\."
  qkv = r"(?P<qkv>query|key|value)"
  for tower, off, depth, self_attn, self_norm in (
      ("text.layers", 0, t.depth, "attn", "attn_norm"),
      ("fusion.layers", t.depth, f.depth, "self_attn", "self_norm"),
  ):
    kw = {"layer_offset": off, "layer_range": (off, off + depth)}
    rules += [
        *_linear_rules(lay + r"attention\.self\." + qkv, rf"{tower}.{self_attn}.\g<qkv>",
                       T.LINEAR_TO_HEADS, T.BIAS_TO_HEADS, **kw),
        *_linear_rules(lay + r"attention\.output\.dense", f"{tower}.{self_attn}.out",
                       T.LINEAR_FROM_HEADS, **kw),
        *_ln_rules(lay + r"attention\.output\.LayerNorm", f"{tower}.{self_norm}", **kw),
        *_linear_rules(lay + r"intermediate\.dense", f"{tower}.mlp.fc1", **kw),
        *_linear_rules(lay + r"output\.dense", f"{tower}.mlp.fc2", **kw),
        *_ln_rules(lay + r"output\.LayerNorm", f"{tower}.mlp_norm", **kw),
    ]
    if tower == "fusion.layers":
      rules += [
          *_linear_rules(lay + r"crossattention\.self\." + qkv, r"fusion.layers.cross_attn.\g<qkv>",
                         T.LINEAR_TO_HEADS, T.BIAS_TO_HEADS, **kw),
          *_linear_rules(lay + r"crossattention\.output\.dense", "fusion.layers.cross_attn.out",
                         T.LINEAR_FROM_HEADS, **kw),
          *_ln_rules(lay + r"crossattention\.output\.LayerNorm", "fusion.layers.cross_norm", **kw),
      ]

  mlm = r"text_encoder\.cls\.predictions\."
  rules += [
      C.Rule(mlm + "bias", "mlm_head.bias"),
      *_linear_rules(mlm + r"transform\.dense", "mlm_head.dense"),
      *_ln_rules(mlm + r"transform\.LayerNorm", "mlm_head.norm"),
      # The decoder is tied (§7.3): checked on import, re-written on export.
      C.Rule(mlm + r"decoder\.weight", "text.embeddings.word", tied=True),
      C.Rule(mlm + r"decoder\.bias", "mlm_head.bias", tied=True),
      *_linear_rules(r"vision_proj", "vision_proj"),
      *_linear_rules(r"text_proj", "text_proj"),
  ]
  for theirs, ours in (("itm_head", "itm_head"), ("bbox_head", "box_head")):
    rules += [
        *_linear_rules(theirs + r"\.0", f"{ours}.fc1"),
        *_ln_rules(theirs + r"\.1", f"{ours}.norm"),
        *_linear_rules(theirs + r"\.3", f"{ours}.fc2"),
    ]
  return rules


# ---------------------------------------------------------------------------------------------
# Conversion both ways.
# ---------------------------------------------------------------------------------------------


def official_to_params(
    state_dict: Mapping[str, Any],
    cfg: ModelConfig,
    strict: bool = True,
    *,
    allow: Iterable[str] = (),
    source_image_size: int | None = None,
    resize_fn: Callable[..., np.ndarray] | None = None,
    init: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], C.CoverageReport]:
  """Official state dict (numpy or torch values) -> (our nested numpy params, coverage report).

  strict: raise `common.ConversionError` on any mismatch not in `allow` (kinds: missing,
    unexpected, shape, check). `strict=False` allows every kind and only reports.
  source_image_size: resolution the checkpoint was trained at, if different from
    `cfg.vision.image_size`: each block's rel-pos table is resized (§7.5) with `resize_fn`
    (default: `x2vlm_jax.models.vision.resize_rel_pos_bias`) and the index buffers are checked
    against the source grid.
  init: concrete params used for our parameters the checkpoint lacks (see `common.merge`).
  """
  allow = set(C.MISMATCH_KINDS) if not strict else set(allow)
  sd = collections.OrderedDict((k, to_numpy(val, k)) for k, val in state_dict.items())
  notes: list[str] = []
  if source_image_size is not None and source_image_size != cfg.vision.image_size:
    if cfg.vision.abs_pos_embed:
      raise ValueError("resizing a vision tower with an absolute position embedding is not "
                       "supported (only the relative-position tables are resized, §7.5)")
    sd, notes = _resize_vision(sd, cfg, source_image_size, resize_fn, allow)
  params, report = C.merge(sd, official_rules(cfg), param_shapes(cfg), allow=allow, init=init,
                           what="official -> jax import")
  report.notes[:0] = notes
  return params, report


def params_to_official(
    params: Mapping[str, Any], cfg: ModelConfig, layout: str = PRETRAIN
) -> "collections.OrderedDict[str, np.ndarray]":
  """Our nested params -> ordered official state dict of numpy arrays (float32 / int64).

  Buffers are recomputed for `cfg`; tied names are written as separate arrays with identical
  values (`torch_io.save_th` re-links them to shared storage). The fine-tuning layout omits the
  MLM head, so `mlm_head.*` is not written there.
  """
  params = to_numpy_tree(params)
  spec = official_state_spec(cfg, layout)
  out = C.export(params, official_rules(cfg), spec.keys(), allow_unused=(layout == FINETUNE),
                 what="jax -> official export")
  bad = [f"{k}: {out[k].shape} {out[k].dtype}, spec {s} {d}"
         for k, (s, d) in spec.items() if out[k].shape != s]
  if bad:
    raise C.ConversionError("exported shapes differ from the official spec:\n  " + "\n  ".join(bad))
  return collections.OrderedDict((k, out[k].astype(spec[k][1], copy=False)) for k in spec)


def _resize_vision(sd, cfg, source_image_size, resize_fn, allow):
  """Resizes rel-pos tables from the source grid to cfg's and swaps in the target index (§7.5)."""
  v = cfg.vision
  if source_image_size % v.patch_size:
    raise ValueError(f"source image size {source_image_size} is not a multiple of patch {v.patch_size}")
  src_grid, dst_grid = source_image_size // v.patch_size, v.grid
  if resize_fn is None:
    try:
      from x2vlm_jax.models.vision import resize_rel_pos_bias as resize_fn
    except ImportError as e:
      raise ImportError("resolution change needs x2vlm_jax.models.vision.resize_rel_pos_bias, "
                        "which is not available in this checkout") from e
  src_index, dst_index = relative_position_index(src_grid), relative_position_index(dst_grid)
  src_rows = (2 * src_grid - 1) ** 2 + 3
  # Check everything against the claimed source grid before interpolating anything.
  bad = [k for k, val in sd.items()
         if (k.endswith("attn.relative_position_index")
             and (val.shape != src_index.shape or not np.array_equal(val, src_index)))
         or (k.endswith("attn.relative_position_bias_table") and val.shape[:1] != (src_rows,))]
  if bad and "check" not in allow:
    raise C.ConversionError(
        f"{bad[0]} (and {len(bad) - 1} more) does not fit the source grid {src_grid} "
        f"(image size {source_image_size}); wrong source resolution?")
  out, notes = collections.OrderedDict(), []
  for k, val in sd.items():
    if k.endswith("attn.relative_position_bias_table") and val.shape[:1] == (src_rows,):
      new = np.asarray(resize_fn(val, src_grid, dst_grid), dtype=val.dtype)
      notes.append(f"{k}: resized {val.shape} -> {new.shape} (grid {src_grid} -> {dst_grid})")
      out[k] = new
    elif k.endswith("attn.relative_position_index"):
      out[k] = dst_index  # recomputed for the target grid
    else:
      out[k] = val
  return out, notes
