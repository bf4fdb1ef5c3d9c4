"""BEiT-2 vision-tower weights -> our vision tower (the importer behind `init.beit_path`).

`load_beit` reads the official `.pth` layout (`blocks.{i}.attn.qkv.weight`, ..., optionally under
'model'/'module', an optional shared table copied into every block, `head.*` dropped) or a
transformers `BeitModel` layout (hub names `beit.encoder.layer.{i}.attention.attention.query` ...
and the v5 in-memory names `layers.{i}.attention.q_proj` ...); relative-position tables are
resized when the checkpoint's grid differs from the config's
(docs/fidelity.md#relative-position-bias-resize). Strict like the BERT importer (`hf.py`).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Mapping

import numpy as np

from x2vlm_jax.convert import apply
from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import transforms as T
from x2vlm_jax.convert.hf import ImportResult, Source, make_result, read_state_dict
from x2vlm_jax.models.config import ModelConfig

_B = r"blocks\.(?P<layer>\d+)\."


def beit_rules() -> list[C.Rule]:
  """Official BEiT-2 `.pth` keys -> vision tower.

  See docs/fidelity.md#initial-weights-from-bert-and-beit-2 and docs/fidelity.md#weight-layouts.
  """
  v = "vision.blocks"
  return [
    C.Rule(r"cls_token", "vision.cls_token"),
    C.Rule(r"patch_embed\.proj\.weight", "vision.patch_embed.kernel", T.CONV_OIHW),
    C.Rule(r"patch_embed\.proj\.bias", "vision.patch_embed.bias"),
    C.Rule(_B + r"gamma_1", f"{v}.gamma_1"),
    C.Rule(_B + r"gamma_2", f"{v}.gamma_2"),
    C.Rule(_B + r"norm1\.weight", f"{v}.norm1.scale"),
    C.Rule(_B + r"norm1\.bias", f"{v}.norm1.bias"),
    C.Rule(_B + r"norm2\.weight", f"{v}.norm2.scale"),
    C.Rule(_B + r"norm2\.bias", f"{v}.norm2.bias"),
    C.Rule(_B + r"attn\.qkv\.weight", f"{v}.attn.qkv.kernel", T.FUSED_QKV),
    C.Rule(_B + r"attn\.q_bias", f"{v}.attn.q_bias", T.BIAS_TO_HEADS),
    C.Rule(_B + r"attn\.v_bias", f"{v}.attn.v_bias", T.BIAS_TO_HEADS),
    C.Rule(_B + r"attn\.relative_position_bias_table", f"{v}.attn.rel_pos_bias"),
    C.Rule(_B + r"attn\.proj\.weight", f"{v}.attn.proj.kernel", T.LINEAR_FROM_HEADS),
    C.Rule(_B + r"attn\.proj\.bias", f"{v}.attn.proj.bias"),
    C.Rule(_B + r"mlp\.fc1\.weight", f"{v}.mlp.fc1.kernel", T.LINEAR),
    C.Rule(_B + r"mlp\.fc1\.bias", f"{v}.mlp.fc1.bias"),
    C.Rule(_B + r"mlp\.fc2\.weight", f"{v}.mlp.fc2.kernel", T.LINEAR),
    C.Rule(_B + r"mlp\.fc2\.bias", f"{v}.mlp.fc2.bias"),
    C.Rule(r"fc_norm\.weight", "vision.fc_norm.scale"),
    C.Rule(r"fc_norm\.bias", "vision.fc_norm.bias"),
    C.Rule(r"head\..*", None),  # the ImageNet classifier; deleted by the official loader
  ]


# transformers BeitModel names -> official names. Hub checkpoints (v4) and v5 in-memory modules.
_HF_BEIT = [
  (r"embeddings\.cls_token", "cls_token"),
  (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
  (r"embeddings\.position_embeddings", "pos_embed"),
  (r"embeddings\.mask_token", "mask_token"),
  (r"(?:encoder\.layer|layers)\.(\d+)\.lambda_(1|2)", r"blocks.\1.gamma_\2"),
  (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
  (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
  (
    r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.query|q_proj)\.(weight|bias)",
    r"blocks.\1.attn.q.\2",
  ),
  (
    r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.key|k_proj)\.(weight|bias)",
    r"blocks.\1.attn.k.\2",
  ),
  (
    r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.value|v_proj)\.(weight|bias)",
    r"blocks.\1.attn.v.\2",
  ),
  (
    r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)",
    r"blocks.\1.attn.proj.\2",
  ),
  (
    r"(?:encoder\.layer\.(\d+)\.intermediate\.dense|layers\.(\d+)\.mlp\.fc1)\.(weight|bias)",
    r"blocks.\1\2.mlp.fc1.\3",
  ),
  (
    r"(?:encoder\.layer\.(\d+)\.output\.dense|layers\.(\d+)\.mlp\.fc2)\.(weight|bias)",
    r"blocks.\1\2.mlp.fc2.\3",
  ),
  (
    r"(?:encoder\.layer|layers)\.(\d+)\.(?:attention\.attention\.)?relative_position_bias\."
    r"relative_position_bias_table",
    r"blocks.\1.attn.relative_position_bias_table",
  ),
  (
    r"(?:encoder\.relative_position_bias|shared_position_bias)\.relative_position_bias_table",
    "rel_pos_bias.relative_position_bias_table",
  ),
  (r"pooler\.layernorm\.(weight|bias)", r"fc_norm.\1"),  # mean pooling's LayerNorm = fc_norm
  (r"layernorm\.(weight|bias)", r"norm.\1"),  # final norm of a non-mean-pooling BEiT
]


def _is_hf_beit(keys: Iterable[str]) -> bool:
  return any(re.match(r"(beit\.)?(embeddings\.|encoder\.layer\.|layers\.\d+\.)", k) for k in keys)


def _hf_beit_to_official(
  sd: Mapping[str, np.ndarray], notes: list[str]
) -> "collections.OrderedDict[str, np.ndarray]":
  """Renames HF keys to the official layout and fuses separate q/k/v into `attn.qkv.weight`."""
  out, unknown = collections.OrderedDict(), []
  for k, v in sd.items():
    k0 = k[len("beit.") :] if k.startswith("beit.") else k
    for pat, rep in _HF_BEIT:
      if re.fullmatch(pat, k0):
        out[re.sub(pat, rep, k0)] = v
        break
    else:
      out[k] = v  # left as is; the strict merge reports it as unexpected
      unknown.append(k)
  blocks = sorted(
    {int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.attn\.q\.weight$", k))}
  )
  for i in blocks:
    p = f"blocks.{i}.attn."
    parts = [out.pop(p + n + ".weight", None) for n in ("q", "k", "v")]
    if any(x is None for x in parts):
      raise C.ConversionError(f"BEiT layer {i}: query/key/value weights must all be present")
    # Rows [q; k; v] (docs/fidelity.md#weight-layouts).
    out[p + "qkv.weight"] = np.concatenate(parts, axis=0)
    k_bias = out.pop(p + "k.bias", None)
    if k_bias is not None and np.any(k_bias != 0):
      raise C.ConversionError(
        f"BEiT layer {i}: a non-zero key bias cannot be represented (the "
        "official attention fixes it at 0)"
      )
    for n, ours in (("q", "q_bias"), ("v", "v_bias")):
      if p + n + ".bias" in out:
        out[p + ours] = out.pop(p + n + ".bias")
  notes.append(f"transformers BEiT layout: {len(blocks)} layers renamed to the official layout")
  return out


def load_beit(
  src: Source, model_cfg: ModelConfig, *, allow: Iterable[str] = (), weights_only: bool = True
) -> ImportResult:
  """BEiT-2 weights (official `.pth` or transformers BeitModel layout) -> vision tower.

  A shared `rel_pos_bias.relative_position_bias_table` is copied into every block; index
  buffers are dropped (recomputed); tables of another grid are resized to the config's grid.
  """
  vcfg = model_cfg.vision
  notes: list[str] = []
  sd = read_state_dict(src, weights_only=weights_only)
  if _is_hf_beit(sd):
    sd = _hf_beit_to_official(sd, notes)
  sd = collections.OrderedDict(
    (k, v) for k, v in sd.items() if not k.endswith("relative_position_index")
  )
  shared = sd.pop("rel_pos_bias.relative_position_bias_table", None)
  if shared is not None:
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    for i in blocks:
      key = f"blocks.{i}.attn.relative_position_bias_table"
      if key in sd:
        raise C.ConversionError(f"{key} and a shared rel_pos_bias table are both present")
      sd[key] = shared
    notes.append(f"shared relative_position_bias_table copied into {len(blocks)} blocks")
  for k in list(sd):
    if k.endswith("attn.relative_position_bias_table") and sd[k].shape[0] != vcfg.num_rel:
      rows = sd[k].shape[0] - 3
      side = int(round(np.sqrt(max(rows, 0))))
      if side * side != rows or side % 2 == 0:
        raise C.ConversionError(f"{k}: {sd[k].shape[0]} rows do not describe a square patch grid")
      from x2vlm_jax.models.vision import resize_rel_pos_bias

      src_grid = (side + 1) // 2
      sd[k] = resize_rel_pos_bias(sd[k], src_grid, vcfg.grid)
      notes.append(f"{k}: resized grid {src_grid} -> {vcfg.grid}")
  shapes = apply.expected_shapes(model_cfg)
  expected = {p: s for p, s in shapes.items() if p.startswith("vision.")}
  params, report = C.merge(sd, beit_rules(), expected, allow=allow, what="BEiT-2 -> vision tower")
  report.notes[:0] = notes
  return make_result(params, report, expected)
