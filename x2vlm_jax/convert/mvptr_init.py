"""MVPTR's initialisation from a 12-layer BERT, as the paper states (P section 4.1, 3.1.1):
textual and visual stacks <- BERT layers 0..depth-1, cross-modal stack <- layers depth..2*depth-1,
the word rows of the table <- BERT's word embeddings, each new phrase row <- the mean of its
words' embeddings (neither is in the released code, reference section 8). Also the VQA head
of a pre-trained model (`init_qa_head_from_mlm`, P App. A.3.2).

The BERT state dict (Hugging Face layout, keys with or without `bert.`) is renamed into an
official MVPTR state dict and imported by the strict `convert.mvptr.mvptr_to_params`, so every
BERT key is either used or reported. Parameters BERT does not have (`img_embedding`,
`txt_proj`/`vis_proj`, `logit_scale`, the tag MLM head, `qa_head`, table rows that are no
phrase) come from `init`, and are listed in the report as missing.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from x2vlm_jax.convert import common as C
from x2vlm_jax.convert.arrays import to_numpy
from x2vlm_jax.convert.mvptr import mvptr_to_params
from x2vlm_jax.models.mvptr_config import MvptrConfig

_LAYER = re.compile(r"(?:bert\.)?encoder\.layer\.(\d+)\.(.*)")
# Entries BERT files carry that MVPTR re-derives: the tied decoder and the position-id buffer.
_DERIVED = re.compile(r"cls\.predictions\.decoder\.(weight|bias)|(bert\.)?embeddings\.position_ids")


def phrase_rows(word_table: np.ndarray, vocab_size: int, phrase_words, fill: np.ndarray):
  """[Vw, D] word rows -> [vocab_size, D] table: words copied, row p of each new phrase = mean of
  the rows of its word pieces `phrase_words[p]`, every other row from `fill` [vocab_size, D]."""
  vw = word_table.shape[0]
  table = np.array(fill, dtype=word_table.dtype, copy=True)
  table[:vw] = word_table
  for pid, words in phrase_words.items():
    words = np.asarray(words, np.int64)
    if not vw <= pid < vocab_size:
      raise ValueError(f"phrase id {pid} is not a new row in [{vw}, {vocab_size})")
    if words.size == 0 or words.min() < 0 or words.max() >= vw:
      raise ValueError(f"phrase id {pid}: word ids {words.tolist()} are not BERT word ids")
    table[pid] = word_table[words].mean(axis=0)
  return table


def bert_to_mvptr_state(bert: Mapping[str, Any], cfg: MvptrConfig, phrase_words, fill_table):
  """A BERT state dict -> an official-format MVPTR state dict (the entries BERT can give)."""
  out: dict[str, np.ndarray] = collections.OrderedDict()
  for key, value in bert.items():
    value = to_numpy(value, key)
    if _DERIVED.fullmatch(key):
      continue
    m = _LAYER.fullmatch(key)
    if m is None:
      name = key if key.startswith(("bert.", "cls.")) else "bert." + key
      out[name] = value
      continue
    i, rest = int(m.group(1)), m.group(2)
    if i < cfg.depth:
      out[f"bert.txt_encoder.layer.{i}.{rest}"] = value
      out[f"bert.vis_encoder.layer.{i}.{rest}"] = value
    else:  # a layer beyond 2 * depth stays under its mul_encoder name and is reported
      out[f"bert.mul_encoder.layer.{i - cfg.depth}.{rest}"] = value
  word = "bert.embeddings.word_embeddings.weight"
  if word not in out:
    raise ValueError("not a BERT state dict: no embeddings.word_embeddings.weight")
  if out[word].shape[0] != cfg.word_vocab_size:
    raise ValueError(
      f"BERT has {out[word].shape[0]} words, config word_vocab_size {cfg.word_vocab_size}"
    )
  out[word] = phrase_rows(out[word], cfg.vocab_size, phrase_words, fill_table)
  if cfg.itm_classes != 2:  # BERT's 2-way NSP head cannot start a 3-way ITM head
    out.pop("cls.seq_relationship.weight", None)
    out.pop("cls.seq_relationship.bias", None)
  return out


def init_from_bert(
  bert: Mapping[str, Any],
  cfg: MvptrConfig,
  phrase_words: Mapping[int, Sequence[int]],
  init: Mapping[str, Any],
) -> tuple[dict[str, Any], C.CoverageReport]:
  """(our params, report): BERT weights where the paper takes them, `init` (concrete params of a
  freshly built model, nested) elsewhere. Strict about everything but missing parameters."""
  fill = np.asarray(init["embeddings"]["word"])
  sd = bert_to_mvptr_state(bert, cfg, phrase_words, fill)
  return mvptr_to_params(sd, cfg, allow=["missing"], init=init)


def init_qa_head_from_mlm(params: Mapping[str, Any], answer_token_ids: Sequence[Sequence[int]]):
  """The VQA head of a pre-trained model (P App. A.3.2): answer a's decoder row and bias are the
  means of the MLM decoder rows (= the tied word rows of the table) and of the MLM bias over
  a's word pieces; the transform (dense + LayerNorm) is the MLM head's. `params`: our nested
  pure dict of a pre-training model (`embeddings.word`, `mlm_head`). Returns the `vqa_head`
  subtree {dense, norm, decoder [A, D], bias [A]} (numpy, float32 as the table)."""
  word = np.asarray(params["embeddings"]["word"])
  mlm = params["mlm_head"]
  bias = np.asarray(mlm["bias"])
  rows, biases = [], []
  for a, ids in enumerate(answer_token_ids):
    ids = np.asarray(list(ids), np.int64)
    if ids.size == 0:
      raise ValueError(f"answer {a} has no word pieces")
    if ids.min() < 0 or ids.max() >= bias.shape[0]:
      raise ValueError(f"answer {a}: word pieces {ids.tolist()} outside [0, {bias.shape[0]})")
    rows.append(word[ids].mean(axis=0))
    biases.append(bias[ids].mean())
  return {
    "dense": {k: np.array(v) for k, v in mlm["dense"].items()},  # copies
    "norm": {k: np.array(v) for k, v in mlm["norm"].items()},
    "decoder": np.stack(rows).astype(word.dtype),
    "bias": np.asarray(biases, bias.dtype),
  }
