"""Official MVPTR state dicts <-> our `MVPTR` params, strict both ways (docs/mvptr.md#weights):
the pre-training class or, by `MvptrConfig.heads`, one of the fine-tuning classes.

The rule table follows `official.py`: `common.Rule`s from official keys to our dotted paths,
`common.merge` for the import (coverage report: missing / unexpected / shape / check) and
`common.export` for the way back, in the official key order of `mvptr_spec.mvptr_state_spec`.

The two MLM decoders (`cls.predictions.decoder.weight`, `half_mlm.decoder.weight`) are the first
`word_vocab_size` rows of the word + phrase table in the official model (`_tie_or_clone_weights`
with `only_vocab`): checked on import, re-written from the table on export. Note: in the released
code that tie only runs when the config sets `torchscript` (a plain tensor slice cannot be
assigned to a Parameter otherwise), and then it is a *clone* that trains on its own; such a file
fails the tie check by name -- allow "check" to import it with the table's rows as the decoder.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from x2vlm_jax.convert import common as C
from x2vlm_jax.convert import official as O
from x2vlm_jax.convert import transforms as T
from x2vlm_jax.convert.arrays import to_numpy, to_numpy_tree
from x2vlm_jax.convert.mvptr_spec import STACKS, mvptr_param_shapes, mvptr_state_spec
from x2vlm_jax.models.mvptr_config import MvptrConfig


def _word_rows(n: int) -> T.Transform:
  """Foreign (n, D) decoder <-> the first n rows of our [V, D] table (tied entries only: the
  import compares, the export slices)."""

  def to_ours(x, s):
    raise AssertionError("a tied decoder is never written into the table")

  return T.Transform("word_rows", to_ours, lambda y: y[:n], lambda s: (n, s[1]))


def mvptr_rules(cfg: MvptrConfig) -> list[C.Rule]:
  """Rules from the keys of the official class of `cfg.heads` to our paths."""
  rules = [
    C.Rule(r"bert\.(?P<p>txt|vis)_proj", r"\g<p>_proj"),  # x @ W: same orientation as ours
    *O._embedding_rules(r"bert\.embeddings\.", "embeddings", cfg.max_positions),
    *O._linear_rules(r"bert\.pooler\.dense", "pooler"),
    *O._linear_rules(r"bert\.img_embedding", "img_embedding"),
  ]
  for stack in STACKS:
    lay = rf"bert\.{stack}\.layer\.(?P<layer>\d+)\."
    rules += O._layer_rules(lay, f"{stack}.layers", "attn", "attn_norm", 0, cfg.depth, False)
  if cfg.heads in ("pretrain", "retrieval"):
    rules.append(C.Rule(r"logit_scale", "logit_scale"))
  if cfg.heads == "pretrain":
    rules += [
      *O._linear_rules(r"cls\.seq_relationship", "itm_head"),
      *O._linear_rules(r"qa_head", "qa_head"),
    ]
    for theirs, ours in ((r"cls\.predictions\.", "mlm_head"), (r"half_mlm\.", "tag_mlm_head")):
      rules += [
        *_head_transform_rules(theirs, ours),
        C.Rule(
          theirs + r"decoder\.weight", "embeddings.word", _word_rows(cfg.word_vocab_size), tied=True
        ),
      ]
  elif cfg.heads == "vqa":
    # BertQAPredictionHead under the same `cls.predictions.` prefix; its decoder is its own
    # [answers, D] matrix, stored as-is (our `MlmHead` keeps an own decoder in [V, D]).
    rules += _head_transform_rules(r"cls\.predictions\.", "vqa_head")
    rules.append(C.Rule(r"cls\.predictions\.decoder\.weight", "vqa_head.decoder"))
  else:
    rules += O._linear_rules(r"classifier", "classifier")
  return rules


def _head_transform_rules(theirs: str, ours: str) -> list[C.Rule]:
  """A prediction head's bias and transform (dense + LayerNorm)."""
  return [
    C.Rule(theirs + "bias", f"{ours}.bias"),
    *O._linear_rules(theirs + r"transform\.dense", f"{ours}.dense"),
    *O._ln_rules(theirs + r"transform\.LayerNorm", f"{ours}.norm"),
  ]


def mvptr_to_params(
  state_dict: Mapping[str, Any],
  cfg: MvptrConfig,
  strict: bool = True,
  *,
  allow: Iterable[str] = (),
  init: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], C.CoverageReport]:
  """Official state dict (numpy or torch values) -> (our nested numpy params, coverage report).
  Strict: any missing / unexpected / shape / check mismatch not in `allow` raises
  `common.ConversionError` naming the keys."""
  allow = set(C.MISMATCH_KINDS) if not strict else set(allow)
  sd = collections.OrderedDict((k, to_numpy(v, k)) for k, v in state_dict.items())
  return C.merge(
    sd,
    mvptr_rules(cfg),
    mvptr_param_shapes(cfg),
    allow=allow,
    init=init,
    what="official MVPTR -> jax import",
  )


def params_to_mvptr(params: Mapping[str, Any], cfg: MvptrConfig) -> "collections.OrderedDict":
  """Our nested params -> the official state dict (float32 numpy, official key order); the tied
  decoders are written as their own arrays equal to the word rows. The paper's phrase head
  (`phrase_head`) has no official key and is left out."""
  spec = mvptr_state_spec(cfg)
  ours = {k: v for k, v in to_numpy_tree(params).items() if k != "phrase_mlm_head"}
  out = C.export(ours, mvptr_rules(cfg), spec.keys(), what="jax -> MVPTR export")
  bad = [f"{k}: {out[k].shape}, spec {s}" for k, (s, _) in spec.items() if out[k].shape != s]
  if bad:
    raise C.ConversionError("exported shapes differ from the MVPTR spec:\n  " + "\n  ".join(bad))
  return collections.OrderedDict((k, np.asarray(out[k], np.float32)) for k in spec)
