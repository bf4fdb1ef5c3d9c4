"""Importers for the towers' initial weights: Hugging Face BERT (here) and BEiT-2 (`hf_beit.py`).

Official behaviour: docs/fidelity.md#initial-weights-from-bert-and-beit-2.

* `load_bert`: a Hugging Face-layout BERT (safetensors or pytorch_model.bin, keys with or without
  `bert.`, TF-style `LayerNorm.gamma/beta` too) -> text tower; fusion layers copied from BERT
  layers (default: the last `fusion.depth` layers, i.e. 6..11 of a 12-layer BERT as the official
  code copies 6-11 into 12-17; for a shallower BERT such as MiniLM-L6 its last `fusion.depth`
  layers); cross-attention stays at its fresh init; the MLM head when the file has one.
* `load_beit`: BEiT-2 weights in the official `.pth` layout (`blocks.{i}.attn.qkv.weight`, ...,
  optionally under 'model'/'module', an optional shared table copied into every block, `head.*`
  dropped) or in a transformers `BeitModel` layout (hub names `beit.encoder.layer.{i}.attention.
  attention.query` ... and the v5 in-memory names `layers.{i}.attention.q_proj` ...); tables are
  resized when the checkpoint's grid differs from the config's
  (docs/fidelity.md#relative-position-bias-resize).

Both return an `ImportResult` (our nested numpy params, the loaded / not-loaded paths, the
coverage report) and are strict: unexpected, missing or mis-shaped keys raise
`common.ConversionError` unless their kind is in `allow`. `apply.apply_params(model,
*(r.params for r in results))` writes them into a model and returns the paths left at init.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from x2vlm_jax import treepath
from x2vlm_jax.convert import apply, torch_io
from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import transforms as T
from x2vlm_jax.convert.arrays import to_numpy
from x2vlm_jax.models.config import ModelConfig, TextConfig

Source = str | pathlib.Path | Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ImportResult:
  """What one importer produced.

  params: nested dict (our tree) holding only the loaded leaves, numpy arrays.
  loaded: dotted paths of our parameters filled from the file.
  not_loaded: dotted paths inside the importer's scope (text+fusion+MLM head, or vision) that
    keep their fresh init (e.g. the fusion cross-attention).
  report: the strict-merge coverage report (notes say what was dropped, copied or resized).
  """

  params: dict[str, Any]
  loaded: frozenset[str]
  not_loaded: frozenset[str]
  report: C.CoverageReport


# ---------------------------------------------------------------------------------------------
# Reading files.
# ---------------------------------------------------------------------------------------------


def read_state_dict(
  src: Source, *, weights_only: bool = True
) -> "collections.OrderedDict[str, np.ndarray]":
  """A state dict as numpy arrays from a mapping, a safetensors / torch file, or an HF directory.

  Directories are searched for `model.safetensors` then `pytorch_model.bin`. A top-level
  'model', 'module' or 'state_dict' sub-dict is unwrapped (BEiT `.pth` files, official
  checkpoints). Torch pickles need torch (imported lazily) and are read with
  `weights_only=True` unless told otherwise (full unpickling is for trusted files only).
  """
  if isinstance(src, Mapping):
    obj: Any = src
  else:
    path = pathlib.Path(src)
    if path.is_dir():
      for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
          path = path / name
          break
      else:
        raise FileNotFoundError(
          f"{src}: no model.safetensors or pytorch_model.bin in this directory"
        )
    if path.suffix == ".safetensors":
      from safetensors.numpy import load_file

      obj = load_file(str(path))
    else:
      return torch_io.load_th(path, weights_only=weights_only)[0]
  for wrapper in ("model", "module", "state_dict"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
      break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{src}: expected a state dict, got {type(obj).__name__}")
  bad = [k for k, v in obj.items() if not hasattr(v, "shape")]
  if bad:
    raise ValueError(f"{src}: entries {bad[:5]} are not tensors; is this a state dict?")
  return collections.OrderedDict((str(k), to_numpy(v, str(k))) for k, v in obj.items())


def text_config_from_hf(path: str | pathlib.Path, **overrides) -> TextConfig:
  """TextConfig from a Hugging Face BERT (or XLM-R / RoBERTa) `config.json` (file or its
  directory)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "config.json"
  hf = json.loads(path.read_text())
  act = hf.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"{path}: hidden_act {act!r}; the text tower implements exact 'gelu' only")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{path}: only absolute position embeddings are supported")
  cfg = TextConfig(
    # RoBERTa-family embeddings (padding-offset positions): docs/multilingual.md
    kind="xlmr" if hf.get("model_type") in ("xlm-roberta", "roberta") else "bert",
    vocab_size=hf["vocab_size"],
    width=hf["hidden_size"],
    depth=hf["num_hidden_layers"],
    num_heads=hf["num_attention_heads"],
    mlp_dim=hf["intermediate_size"],
    max_positions=hf["max_position_embeddings"],
    type_vocab_size=hf.get("type_vocab_size", 2),
    pad_token_id=hf.get("pad_token_id", 0) or 0,
    ln_eps=hf.get("layer_norm_eps", 1e-12),
    dropout=hf.get("hidden_dropout_prob", 0.1),
  )
  return dataclasses.replace(cfg, **overrides)


# ---------------------------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------------------------


def make_result(params: dict, report: C.CoverageReport, scope: Iterable[str]) -> ImportResult:
  loaded = frozenset(treepath.flatten_dict(params))
  return ImportResult(params, loaded, frozenset(scope) - loaded, report)


def _combine(a: C.CoverageReport, b: C.CoverageReport) -> C.CoverageReport:
  return C.CoverageReport(
    *(getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(C.CoverageReport))
  )


def _deep_update(dst: dict, src: Mapping) -> dict:
  for k, v in src.items():
    if isinstance(v, Mapping):
      _deep_update(dst.setdefault(k, {}), v)
    else:
      dst[k] = v
  return dst


# ---------------------------------------------------------------------------------------------
# BERT.
# ---------------------------------------------------------------------------------------------

_L = r"encoder\.layer\.(?P<layer>\d+)\."


def _bert_layer_rules(ours: str, attn: str, attn_norm: str) -> list[C.Rule]:
  """Rules of one post-LN BERT layer into our stacked `ours` (text.layers / fusion.layers)."""
  r = []
  for name in ("query", "key", "value"):
    r += [
      C.Rule(
        _L + rf"attention\.self\.{name}\.weight", f"{ours}.{attn}.{name}.kernel", T.LINEAR_TO_HEADS
      ),
      C.Rule(_L + rf"attention\.self\.{name}\.bias", f"{ours}.{attn}.{name}.bias", T.BIAS_TO_HEADS),
    ]
  r += [
    C.Rule(
      _L + r"attention\.output\.dense\.weight", f"{ours}.{attn}.out.kernel", T.LINEAR_FROM_HEADS
    ),
    C.Rule(_L + r"attention\.output\.dense\.bias", f"{ours}.{attn}.out.bias"),
    C.Rule(_L + r"attention\.output\.LayerNorm\.weight", f"{ours}.{attn_norm}.scale"),
    C.Rule(_L + r"attention\.output\.LayerNorm\.bias", f"{ours}.{attn_norm}.bias"),
    C.Rule(_L + r"intermediate\.dense\.weight", f"{ours}.mlp.fc1.kernel", T.LINEAR),
    C.Rule(_L + r"intermediate\.dense\.bias", f"{ours}.mlp.fc1.bias"),
    C.Rule(_L + r"output\.dense\.weight", f"{ours}.mlp.fc2.kernel", T.LINEAR),
    C.Rule(_L + r"output\.dense\.bias", f"{ours}.mlp.fc2.bias"),
    C.Rule(_L + r"output\.LayerNorm\.weight", f"{ours}.mlp_norm.scale"),
    C.Rule(_L + r"output\.LayerNorm\.bias", f"{ours}.mlp_norm.bias"),
  ]
  return r


def bert_rules(text: TextConfig) -> list[C.Rule]:
  """HF BERT keys (after `bert.` stripping and gamma/beta renaming) -> text tower + MLM head."""
  positions = np.arange(text.max_positions)[None]
  return [
    C.Rule(r"embeddings\.word_embeddings\.weight", "text.embeddings.word"),
    C.Rule(r"embeddings\.position_embeddings\.weight", "text.embeddings.position"),
    C.Rule(r"embeddings\.token_type_embeddings\.weight", "text.embeddings.token_type"),
    C.Rule(r"embeddings\.LayerNorm\.weight", "text.embeddings.norm.scale"),
    C.Rule(r"embeddings\.LayerNorm\.bias", "text.embeddings.norm.bias"),
    C.Rule(r"embeddings\.position_ids", None, expect=lambda m: positions),
    *_bert_layer_rules("text.layers", "attn", "attn_norm"),
    C.Rule(r"cls\.predictions\.transform\.dense\.weight", "mlm_head.dense.kernel", T.LINEAR),
    C.Rule(r"cls\.predictions\.transform\.dense\.bias", "mlm_head.dense.bias"),
    C.Rule(r"cls\.predictions\.transform\.LayerNorm\.weight", "mlm_head.norm.scale"),
    C.Rule(r"cls\.predictions\.transform\.LayerNorm\.bias", "mlm_head.norm.bias"),
    C.Rule(r"cls\.predictions\.bias", "mlm_head.bias"),
    # The decoder is tied to the word embeddings and its bias to cls.predictions.bias
    # (docs/fidelity.md#tied-decoder-entries).
    C.Rule(r"cls\.predictions\.decoder\.weight", "text.embeddings.word", tied=True),
    C.Rule(r"cls\.predictions\.decoder\.bias", "mlm_head.bias", tied=True),
    # Never used by X2-VLM (no pooler, no NSP head): dropped, as the official loader ignores them.
    C.Rule(r"pooler\..*", None),
    C.Rule(r"cls\.seq_relationship\..*", None),
  ]


def _normalise_bert_keys(
  sd: Mapping[str, np.ndarray],
) -> "collections.OrderedDict[str, np.ndarray]":
  out = collections.OrderedDict()
  for k, v in sd.items():
    k2 = k[len("bert.") :] if k.startswith("bert.") else k
    k2 = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k2)  # TF-era checkpoints
    k2 = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k2)
    if k2 in out:
      raise C.ConversionError(f"{k}: duplicates another key after removing 'bert.' / gamma-beta")
    out[k2] = v
  return out


def _check_hf_config(src: Source, text: TextConfig) -> None:
  if isinstance(src, Mapping):
    return
  path = pathlib.Path(src)
  cfg_file = (path if path.is_dir() else path.parent) / "config.json"
  if not cfg_file.exists():
    return
  theirs = text_config_from_hf(cfg_file)
  fields = (
    "vocab_size",
    "width",
    "depth",
    "num_heads",
    "mlp_dim",
    "max_positions",
    "type_vocab_size",
    "ln_eps",
  )
  bad = [
    f"{f}: file {getattr(theirs, f)} vs model {getattr(text, f)}"
    for f in fields
    if getattr(theirs, f) != getattr(text, f)
  ]
  if bad:
    raise ValueError(f"{cfg_file} does not match the model's TextConfig: " + "; ".join(bad))


def load_bert(
  src: Source,
  model_cfg: ModelConfig,
  *,
  fusion_layers: Iterable[int] | None = None,
  allow: Iterable[str] = (),
  weights_only: bool = True,
) -> ImportResult:
  """HF BERT -> text tower (+ fusion self-attn/FFN copies, + MLM head when present).

  fusion_layers: BERT layer copied into each fusion layer (default: the last fusion.depth
    layers). Cross-attention and its LayerNorm are not in BERT and stay at init.
  allow: mismatch kinds that do not raise ('missing', 'unexpected', 'shape', 'check').
  A file without `cls.predictions.*` leaves the MLM head at init (listed in not_loaded).
  """
  text, fusion = model_cfg.text, model_cfg.fusion
  _check_hf_config(src, text)
  sd = _normalise_bert_keys(read_state_dict(src, weights_only=weights_only))
  shapes = apply.expected_shapes(model_cfg)
  scope = [p for p in shapes if p.split(".")[0] in ("text", "fusion", "mlm_head")]
  layer_ids = sorted(
    {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
  )
  n_src = (max(layer_ids) + 1) if layer_ids else 0
  if n_src != text.depth:
    raise C.ConversionError(f"BERT has {n_src} layers but the text tower has depth {text.depth}")

  has_mlm = any(k.startswith("cls.predictions.") for k in sd)
  text_expected = {
    p: s
    for p, s in shapes.items()
    if p.startswith("text.") or (has_mlm and p.startswith("mlm_head."))
  }
  params, report = C.merge(
    sd, bert_rules(text), text_expected, allow=allow, what="HF BERT -> text tower"
  )
  if not has_mlm:
    report.notes.append("no cls.predictions.* in the file: MLM head left at init")

  # Fusion layers: self-attention + FFN copied from chosen BERT layers
  # (docs/fidelity.md#initial-weights-from-bert-and-beit-2).
  fusion_layers = (
    list(range(n_src - fusion.depth, n_src))
    if fusion_layers is None
    else [int(i) for i in fusion_layers]
  )
  if len(fusion_layers) != fusion.depth or any(not 0 <= i < n_src for i in fusion_layers):
    raise ValueError(
      f"fusion_layers {fusion_layers} must name {fusion.depth} of the BERT's {n_src} layers"
    )
  if (fusion.num_heads, fusion.mlp_dim) != (text.num_heads, text.mlp_dim):
    raise ValueError(
      "fusion layers can be copied from BERT only when their heads/mlp_dim equal "
      f"the text tower's: fusion ({fusion.num_heads}, {fusion.mlp_dim}) vs text "
      f"({text.num_heads}, {text.mlp_dim})"
    )
  sub = collections.OrderedDict()
  for j, i in enumerate(fusion_layers):
    prefix = f"encoder.layer.{i}."
    for k, v in sd.items():
      if k.startswith(prefix):
        sub[f"encoder.layer.{j}." + k[len(prefix) :]] = v
  fusion_expected = {
    p: s
    for p, s in shapes.items()
    if re.match(r"fusion\.layers\.(self_attn|self_norm|mlp|mlp_norm)\.", p)
  }
  fparams, freport = C.merge(
    sub,
    _bert_layer_rules("fusion.layers", "self_attn", "self_norm"),
    fusion_expected,
    allow=allow,
    what="HF BERT -> fusion self-attn/FFN",
  )
  freport.matched.clear()  # the same foreign keys were already counted as matched above
  freport.notes.append(
    f"fusion layers 0..{fusion.depth - 1} <- BERT layers {fusion_layers} "
    "(self-attention + FFN); cross-attention left at init"
  )
  return make_result(_deep_update(params, fparams), _combine(report, freport), scope)
