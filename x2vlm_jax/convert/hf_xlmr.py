"""Hugging Face XLM-R (`XLMRobertaModel` / `...ForMaskedLM`) weights -> our XLM-R text tower.

Official behaviour: docs/multilingual.md#conversion. The official multilingual model builds its
text encoder as a RobertaModel without pooler and with no cross-attention, and creates its MLM
head fresh (`BertOnlyMLMHead`, never XLM-R's `lm_head`), so only `text.*` is filled here; the
cross encoder and heads come from an X2-VLM / CCLM checkpoint (`official.py`) or stay at init.

Keys are accepted with or without the `roberta.` prefix (ForMaskedLM files); `pooler.*` and
`lm_head.*` are dropped with a note; the `position_ids` buffer, when the file has one, must be
arange(max_positions). Strict like `hf.load_bert`: anything else unexpected, missing or
mis-shaped raises `common.ConversionError` unless its kind is in `allow`.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
from collections.abc import Iterable

import numpy as np

from x2vlm_jax.convert import apply, hf
from x2vlm_jax.convert import common as C
from x2vlm_jax.models.config import ModelConfig, TextConfig


def xlmr_config_from_hf(path: str | pathlib.Path, **overrides) -> TextConfig:
  """TextConfig(kind="xlmr") from an HF XLM-R `config.json` (file or directory), whatever its
  model_type says."""
  cfg = hf.text_config_from_hf(path)
  return dataclasses.replace(cfg, kind="xlmr", **overrides)


def xlmr_rules(text: TextConfig) -> list[C.Rule]:
  """HF XLM-R keys (without `roberta.`) -> our text tower: the BERT embedding and layer rules
  (same key names) without the BERT MLM head, plus the entries X2-VLM never uses."""
  positions = np.arange(text.max_positions)[None]
  rules = [r for r in hf.bert_rules(text) if not r.pattern.startswith(r"cls\.")]
  rules = [r for r in rules if "position_ids" not in r.pattern]
  return rules + [
    C.Rule(r"embeddings\.position_ids", None, expect=lambda m: positions),
    C.Rule(r"lm_head\..*", None),  # XLM-R's own LM head: the official mlm_head is fresh
  ]


def load_xlmr(
  src: hf.Source,
  model_cfg: ModelConfig,
  *,
  allow: Iterable[str] = (),
  weights_only: bool = True,
) -> hf.ImportResult:
  """HF XLM-R (directory, safetensors, pytorch_model.bin or a state-dict mapping) -> `text.*`."""
  text = model_cfg.text
  if text.kind != "xlmr":
    raise ValueError(
      f"load_xlmr needs an XLM-R text tower (TextConfig.kind 'xlmr'), got {text.kind!r}"
    )
  if not isinstance(src, (dict, collections.abc.Mapping)):
    path = pathlib.Path(src)
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if cfg_file.exists():
      theirs = xlmr_config_from_hf(cfg_file)
      fields = ("vocab_size", "width", "depth", "num_heads", "mlp_dim", "max_positions")
      fields += ("type_vocab_size", "pad_token_id", "ln_eps")
      bad = [
        f"{f}: {getattr(theirs, f)} vs {getattr(text, f)}"
        for f in fields
        if getattr(theirs, f) != getattr(text, f)
      ]
      if bad:
        raise ValueError(f"{cfg_file} does not match the model's TextConfig: " + "; ".join(bad))
  sd = collections.OrderedDict()
  for k, v in hf.read_state_dict(src, weights_only=weights_only).items():
    k2 = k[len("roberta.") :] if k.startswith("roberta.") else k
    if k2 in sd:
      raise C.ConversionError(f"{k}: duplicates another key after removing 'roberta.'")
    sd[k2] = v
  shapes = apply.expected_shapes(model_cfg)
  expected = {p: s for p, s in shapes.items() if p.startswith("text.")}
  params, report = C.merge(
    sd, xlmr_rules(text), expected, allow=allow, what="HF XLM-R -> text tower"
  )
  dropped = sorted({k.split(".")[0] for k in sd if k.startswith(("pooler.", "lm_head."))})
  if dropped:
    report.notes.append(f"dropped {', '.join(dropped)} (unused by the XVLMPlus text encoder)")
  return hf.make_result(params, report, expected)
