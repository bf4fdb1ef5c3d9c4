"""Recover a `ModelConfig` from an official X2-VLM checkpoint.

Widths, depths, vocabulary, frame count and the checkpoint's resolution are read off the state
dict's shapes. What shapes cannot tell comes, in order of precedence, from explicit arguments
(CLI flags), then the checkpoint's embedded YAML `config` dict (official keys
`text_fusion_start_at`, `text_num_hidden_layers`, `image_res`, `patch_size`, `embed_dim`,
`frame_len`; docs/fidelity.md#config-recovery), then defaults: text heads = width / 64 (d_h = 64
in both released sizes, docs/fidelity.md#model-sizes). Vision heads are the second dimension of
any rel-pos table (docs/fidelity.md#relative-position-bias). The text/fusion split defaults to
the first layer that has cross-attention weights.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from x2vlm_jax.models.config import ModelConfig

# Our additions to the official config dict: sizes the official YAML leaves to BERT's config.json.
OURS_KEY = "x2vlm_jax"


def _shape(sd: Mapping[str, Any], key: str):
  v = sd.get(key)
  return None if v is None else tuple(v.shape)


def _find(sd, pattern):
  """First key matching `pattern` (full match) and its shape, or (None, None)."""
  for k, v in sd.items():
    if re.fullmatch(pattern, k):
      return k, tuple(v.shape)
  return None, None


def _indices(sd, pattern) -> set[int]:
  return {int(m.group(1)) for k in sd if (m := re.fullmatch(pattern, k))}


def infer_config(
  sd: Mapping[str, Any],
  ckpt_config: Mapping[str, Any] | None = None,
  *,
  variant: str | None = None,
  num_heads: int | None = None,
  text_layers: int | None = None,
  fusion_layers: int | None = None,
  image_size: int | None = None,
) -> tuple[ModelConfig, int, list[str]]:
  """(config for our model, the checkpoint's own image size, notes on where values came from).

  `image_size` is the *target* resolution: when it differs from the checkpoint's, the caller
  resizes the rel-pos tables (official.official_to_params(source_image_size=...)).
  """
  ck = dict(ckpt_config or {})
  notes: list[str] = []
  ours = dict(ck.get(OURS_KEY) or {})  # written by `official_config_dict`
  if num_heads is None and "text_num_heads" in ours:
    num_heads = int(ours["text_num_heads"])
  if variant is None and "variant" in ours:
    variant = str(ours["variant"])
  if any(k.startswith("cross_encoder.") for k in sd):  # the multilingual XVLMPlus layout
    from x2vlm_jax.convert import official_plus  # pylint: disable=g-import-not-at-top

    cfg, source_size = official_plus.infer_plus_config(
      sd, ck, variant, num_heads, image_size, notes
    )
    return cfg, source_size, notes
  word_key, word = _find(
    sd, r"text_encoder\.(?:bert\.|roberta\.)?embeddings\.word_embeddings\.weight"
  )
  if word is None:
    raise ValueError(
      "not an X2-VLM state dict: no text_encoder[.bert].embeddings.word_embeddings.weight"
    )
  if variant is None:
    variant = "large" if word[1] == 1024 else "base"
    notes.append(f"variant defaults: {variant} (text width {word[1]})")
  base = ModelConfig.named(variant)
  v, t, f = base.vision, base.text, base.fusion

  vision, source_size = infer_vision(sd, ck, v, image_size, notes)
  text, fusion = _infer_text_fusion(
    sd, ck, t, f, word, num_heads, text_layers, fusion_layers, notes
  )

  proj = _shape(sd, "vision_proj.weight") or _shape(sd, "text_proj.weight")
  embed_dim = proj[0] if proj is not None else int(ck.get("embed_dim", base.embed_dim))
  frames = _shape(sd, "absolute_frame_pos_embed")
  frame_len = frames[1] if frames is not None else 0
  cfg = dataclasses.replace(
    base, vision=vision, text=text, fusion=fusion, embed_dim=embed_dim, frame_len=frame_len
  )
  if "temp" in ck:
    cfg = dataclasses.replace(cfg, temp_init=float(ck["temp"]))
  return cfg, source_size, notes


def infer_vision(sd, ck, v, image_size, notes):
  """(vision config, the checkpoint's image size) from the vision encoder's shapes."""
  # ---- vision: width, depth, MLP, patch, heads and resolution from shapes
  # (docs/fidelity.md#official-key-list).
  cls = _shape(sd, "vision_encoder.cls_token")
  patch = _shape(sd, "vision_encoder.patch_embed.proj.weight")
  blocks = _indices(sd, r"vision_encoder\.blocks\.(\d+)\..*")
  _, fc1 = _find(sd, r"vision_encoder\.blocks\.\d+\.mlp\.fc1\.weight")
  _, table = _find(sd, r"vision_encoder\.blocks\.\d+\.attn\.relative_position_bias_table")
  vkw: dict[str, Any] = {}
  if cls is not None:
    vkw["width"] = cls[-1]
  if _shape(sd, "vision_encoder.pos_embed") is not None:
    vkw["abs_pos_embed"] = True
    notes.append("vision absolute position embedding: present (vision_encoder.pos_embed)")
  if blocks:
    vkw["depth"] = max(blocks) + 1
  if fc1 is not None:
    vkw["mlp_dim"] = fc1[0]
  if patch is not None:
    vkw["patch_size"] = patch[-1]
  elif "patch_size" in ck:
    vkw["patch_size"] = int(ck["patch_size"])
  psize = vkw.get("patch_size", v.patch_size)
  source_size = None
  if table is not None:
    vkw["num_heads"] = table[1]
    side = (table[0] - 3) ** 0.5  # num_rel = (2P - 1)^2 + 3
    if side != int(side) or int(side) % 2 == 0:
      raise ValueError(f"relative_position_bias_table has {table[0]} rows, not (2P-1)^2 + 3")
    source_size = (int(side) + 1) // 2 * psize
    if "image_res" in ck and int(ck["image_res"]) != source_size:
      notes.append(
        f"config image_res {ck['image_res']} disagrees with the tables ({source_size}); "
        "using the tables"
      )
  elif "image_res" in ck:
    source_size = int(ck["image_res"])
  else:
    source_size = v.image_size
  vkw["image_size"] = image_size or source_size
  return dataclasses.replace(v, **vkw), source_size


def _infer_text_fusion(sd, ck, t, f, word, num_heads, text_layers, fusion_layers, notes):
  """(text config, fusion config) from the BERT stack's shapes; `word`: the embedding shape."""
  # ---- text and fusion: one official BERT stack split in two
  # (docs/fidelity.md#text-and-fusion-towers).
  lay = r"text_encoder\.(?:bert\.|roberta\.)?encoder\.layer\.(\d+)\..*"
  all_layers = _indices(sd, lay)
  cross = _indices(
    sd, r"text_encoder\.(?:bert\.|roberta\.)?encoder\.layer\.(\d+)\.crossattention\..*"
  )
  total = (
    max(all_layers) + 1 if all_layers else int(ck.get("text_num_hidden_layers", t.depth + f.depth))
  )
  if text_layers is None and "text_fusion_start_at" in ck:
    text_layers = int(ck["text_fusion_start_at"])
    notes.append(f"text layers {text_layers} from config text_fusion_start_at")
  if text_layers is None:
    text_layers = min(cross) if cross else total - (fusion_layers or f.depth)
    notes.append(f"text layers {text_layers} from the first layer with cross-attention")
  if cross and min(cross) != text_layers:
    raise ValueError(
      f"text/fusion split: {text_layers} text layers requested but the first layer "
      f"with cross-attention is {min(cross)}"
    )
  if fusion_layers is None:
    fusion_layers = total - text_layers
  if text_layers + fusion_layers != total:
    raise ValueError(
      f"{text_layers} text + {fusion_layers} fusion layers != {total} layers in the checkpoint"
    )
  _, inter = _find(
    sd, r"text_encoder\.(?:bert\.|roberta\.)?encoder\.layer\.0\.intermediate\.dense\.weight"
  )
  _, finter = _find(
    sd,
    rf"text_encoder\.(?:bert\.|roberta\.)?encoder\.layer\.{text_layers}\.intermediate\.dense\.weight",
  )
  _, pos = _find(sd, r"text_encoder\.(?:bert\.|roberta\.)?embeddings\.position_embeddings\.weight")
  _, ttype = _find(
    sd, r"text_encoder\.(?:bert\.|roberta\.)?embeddings\.token_type_embeddings\.weight"
  )
  width = word[1]
  if num_heads is None:
    if width % 64:
      raise ValueError(
        f"text width {width} is not a multiple of 64: pass the head count (--num-heads)"
      )
    num_heads = width // 64
    notes.append(f"text heads {num_heads} = width / 64 (default head dim)")
  if width % num_heads:
    raise ValueError(f"text width {width} is not divisible by {num_heads} heads")
  tkw = {"vocab_size": word[0], "width": width, "depth": text_layers, "num_heads": num_heads}
  if inter is not None:
    tkw["mlp_dim"] = inter[0]
  if pos is not None:
    tkw["max_positions"] = pos[0]
  if ttype is not None:
    tkw["type_vocab_size"] = ttype[0]
  text = dataclasses.replace(t, **tkw)
  return text, dataclasses.replace(
    f,
    depth=fusion_layers,
    num_heads=num_heads,
    mlp_dim=finter[0] if finter is not None else text.mlp_dim,
  )


def official_config_dict(cfg: ModelConfig, variant: str | None = None) -> dict[str, Any]:
  """The config dict written next to an exported state dict (plain types only).

  Official YAML keys (docs/fidelity.md#config-recovery) for the sizes the official code reads,
  plus an `x2vlm_jax` entry with what the YAML does not carry (text head count), so our own files
  re-import without flags.
  """
  if cfg.xvlm_plus:  # the XVLMPlus / CCLM YAML keys (docs/multilingual.md#conversion)
    size = "large" if cfg.text.width == 1024 else "base"
    layers = {
      "text_encoder": f"data/xlm-roberta-{size}",
      "text_num_hidden_layers": cfg.text.depth,
      "cross_encoder": "data/bert-large-uncased-12l"
      if size == "large"
      else "data/bert-base-uncased",
      "cross_num_hidden_layers": cfg.fusion.depth,
    }
  else:
    layers = {
      "text_num_hidden_layers": cfg.text.depth + cfg.fusion.depth,
      "text_fusion_start_at": cfg.text.depth,
    }
  out: dict[str, Any] = {
    "use_beit_v2": True,
    "image_res": cfg.vision.image_size,
    "patch_size": cfg.vision.patch_size,
    "embed_dim": cfg.embed_dim,
    "temp": cfg.temp_init,
    **layers,
  }
  if cfg.frame_len > 0:
    out.update(video_encoding="avgpool", frame_len=cfg.frame_len, add_frame_pos=True)
  ours: dict[str, Any] = {"text_num_heads": cfg.text.num_heads}
  if cfg.vision.abs_pos_embed:  # not an official YAML key: BEiT's use_abs_pos_emb is hard-coded off
    ours["vision_abs_pos_embed"] = True
  if variant is not None:
    ours["variant"] = variant
  out[OURS_KEY] = ours
  return out
