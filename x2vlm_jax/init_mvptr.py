"""Initial weights of an MVPTR run (docs/mvptr.md#training): the MVPTR branch of
`init_lib.initialize`.

  nothing      every parameter from its initializer (the tiny CPU configs)
  bert_dir     a 12-layer BERT as the paper states (`convert.mvptr_init.init_from_bert`: textual
               and visual stacks <- layers 0..depth-1, cross-modal <- the next depth layers, word
               rows <- BERT's words, each phrase row <- the mean of its words' rows, from the
               JSON `init.phrase_words` {phrase id: [word-piece ids]}; without it phrase rows stay
               at their initializer)
  checkpoint   (`init_lib`, shared with X²-VLM) the parameters of an MVPTR run's newest good
               checkpoint: stage 2 starts from stage 1's checkpoint, parameters only; a
               fine-tuning model (another `heads`) from a pre-training run's: the source's heads
               are dropped and the task's head keeps its initializer (`checkpoint_params`),
               except the VQA head: from the MLM rows of each answer's word pieces
               (`convert.mvptr_init.init_qa_head_from_mlm`, the official `base_for_vqa`)

Every parameter of MVPTR is trained at the one learning rate (paper and code have no
multiplier for new parameters), so an MVPTR run has no fresh parameter group.
"""

from __future__ import annotations

import json

from flax import nnx

from x2vlm_jax import paths
from x2vlm_jax.convert import adapt


def phrase_words(path: str) -> dict[int, list[int]]:
  """{phrase id: word-piece ids} from a JSON object file; '' = none."""
  if not path:
    return {}
  p = paths.path(path)
  if not p.exists():
    raise FileNotFoundError(f"config.init.phrase_words = {path!r} does not exist")
  raw = json.loads(p.read_text())
  if not isinstance(raw, dict):
    raise ValueError(f"config.init.phrase_words {path}: expected a JSON object id -> word ids")
  try:
    return {int(k): [int(w) for w in v] for k, v in raw.items()}
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.init.phrase_words {path}: bad entry ({e})") from None


def from_bert(model, bert_dir: str, phrase_words_path: str, notes: list[str]) -> None:
  """Writes the paper's BERT initialisation into `model` (an MVPTR, parameters sharded)."""
  from x2vlm_jax.convert import apply, hf, mvptr_init  # pylint: disable=g-import-not-at-top

  sd = hf.read_state_dict(bert_dir)
  host = _nested_host(nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # the `init` fill-ins
  params, report = mvptr_init.init_from_bert(
    sd, model.cfg, phrase_words(phrase_words_path), init=host
  )
  apply.apply_params(model, params)
  notes.append(f"MVPTR from BERT {bert_dir}:\n{report.summary()}")


def checkpoint_params(model, params, src_cfg, notes: list[str], answer_pieces=()) -> frozenset[str]:
  """Writes a checkpoint's parameters into `model`; returns the paths it did not hold. With the
  same `heads` every parameter must match; with other heads (pre-training -> fine-tuning) the
  top-level modules the model lacks (the source's heads) are dropped and named in `notes`; a
  VQA model from a pre-training run gets its head from the MLM rows of `answer_pieces` (each
  answer's word pieces, in answer order)."""
  from x2vlm_jax import treepath  # pylint: disable=g-import-not-at-top
  from x2vlm_jax.convert import apply  # pylint: disable=g-import-not-at-top

  if model.cfg.heads == "vqa" and src_cfg.heads == "pretrain":
    params = {**params, "vqa_head": _vqa_head(model, params, answer_pieces, notes)}
  if src_cfg.heads != model.cfg.heads:
    ours = {p.split(".")[0] for p in treepath.flatten_state(nnx.state(model, nnx.Param))}
    flat = treepath.flatten_dict(params)
    dropped = sorted({p.split(".")[0] for p in flat} - ours)
    params = treepath.unflatten_dict({p: v for p, v in flat.items() if p.split(".")[0] in ours})
    notes.append(f"heads {src_cfg.heads!r} -> {model.cfg.heads!r}: dropped {dropped}")
  missing = apply.apply_params(model, params)
  if missing:
    notes.append(f"from their initializer (not in the checkpoint): {sorted(missing)}")
  return missing


def _vqa_head(model, params, answer_pieces, notes: list[str]) -> dict:
  """The VQA head of `init_qa_head_from_mlm` on the checkpoint's word rows and MLM head."""
  from x2vlm_jax.convert.mvptr_init import init_qa_head_from_mlm  # pylint: disable=g-import-not-at-top

  n = model.cfg.qa_answers
  if len(answer_pieces) != n:
    raise ValueError(
      f"config.model.mvptr.qa_answers = {n}, but the answer list of config.data.mvptr.spec has "
      f"{len(answer_pieces)} answers (the VQA head starts from each answer's MLM rows)"
    )
  host = _nested_host({"embeddings": {"word": params["embeddings"]["word"]}})
  host["mlm_head"] = _nested_host(params["mlm_head"])
  notes.append(f"vqa_head: {n} answers from the mean MLM rows of their word pieces")
  return init_qa_head_from_mlm(host, answer_pieces)


def _nested_host(tree):
  """A nested dict of (sharded) arrays -> the same of host numpy arrays."""
  if isinstance(tree, dict):
    return {k: _nested_host(v) for k, v in tree.items()}
  return adapt.to_host(tree)
