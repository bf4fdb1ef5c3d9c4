"""What an official MVPTR state dict holds, and our parameter shapes (pure NumPy).

- `mvptr_state_spec(cfg)`: every entry of the state dict of the official class of `cfg.heads`
  (pre-training `BiBertImgForPreTraining`, or a fine-tuning class: `BiImageBertForRetrieval`,
  `BiImageBertForVQA`, `BiImageBertForSequenceClassification`, `BiImageBertForRE`;
  Junction4Nako/mvp_pytorch, `oscar/modeling/modeling_vlbert.py`) --
  key, PyTorch shape, in `state_dict()` order (a module's own parameters before its sub-modules,
  sub-modules in registration order: `bert.txt_proj`, `bert.vis_proj`, then `embeddings`,
  `vis_encoder`, `txt_encoder`, `mul_encoder`, `pooler`, `img_embedding`; then `cls`,
  `half_mlm`, `qa_head`). The old `pytorch_transformers` BertEmbeddings has no `position_ids`
  buffer, so the file holds no buffers.
- `mvptr_param_shapes(cfg)`: our side, {dotted path: (shape, dtype)}; tests/test_mvptr_convert.py
  checks it against `nnx.eval_shape` of the real model.
- `TIED`: the two decoder weights of the pre-training class, tied to the first
  `word_vocab_size` rows of the table (`tied_keys`).
"""

from __future__ import annotations

import collections

import numpy as np

from x2vlm_jax.models.mvptr_config import MvptrConfig

F32 = np.dtype(np.float32)
STACKS = ("vis_encoder", "txt_encoder", "mul_encoder")  # official registration order
TIED = ("cls.predictions.decoder.weight", "half_mlm.decoder.weight")


def mvptr_state_spec(cfg: MvptrConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Ordered {official key: (PyTorch shape, float32)} for `cfg` (the class of `cfg.heads`)."""
  d = cfg.width
  spec: dict[str, tuple[tuple[int, ...], np.dtype]] = collections.OrderedDict()

  def add(key, *shape):
    spec[key] = (tuple(shape), F32)

  if cfg.heads in ("pretrain", "retrieval"):
    add("logit_scale")  # the class's own parameter, before its `bert` sub-module
  _bert_spec(cfg, add)
  if cfg.heads == "pretrain":
    for head in ("cls.predictions.", "half_mlm."):
      _prediction_head(add, head, d, cfg.word_vocab_size)
      if head == "cls.predictions.":
        add("cls.seq_relationship.weight", cfg.itm_classes, d)
        add("cls.seq_relationship.bias", cfg.itm_classes)
    if cfg.qa_answers > 0:
      add("qa_head.weight", cfg.qa_answers, d)
      add("qa_head.bias", cfg.qa_answers)
  elif cfg.heads == "vqa":
    _prediction_head(add, "cls.predictions.", d, cfg.qa_answers)  # BertQAPredictionHead
  else:
    add("classifier.weight", cfg.classifier_labels, d)
    add("classifier.bias", cfg.classifier_labels)
  return spec


def _prediction_head(add, head: str, d: int, n: int) -> None:
  """BertLMPredictionHead / BertQAPredictionHead: own bias first, then transform, decoder."""
  add(head + "bias", n)
  add(head + "transform.dense.weight", d, d)
  add(head + "transform.dense.bias", d)
  add(head + "transform.LayerNorm.weight", d)
  add(head + "transform.LayerNorm.bias", d)
  add(head + "decoder.weight", n, d)  # no decoder bias


def _bert_spec(cfg: MvptrConfig, add) -> None:
  """`bert.*`: the `BiBertImgModel` shared by every class."""
  d, f = cfg.width, cfg.mlp_dim
  add("bert.txt_proj", d, d)
  add("bert.vis_proj", d, d)
  e = "bert.embeddings."
  add(e + "word_embeddings.weight", cfg.vocab_size, d)
  add(e + "position_embeddings.weight", cfg.max_positions, d)
  add(e + "token_type_embeddings.weight", cfg.type_vocab_size, d)
  add(e + "LayerNorm.weight", d)
  add(e + "LayerNorm.bias", d)
  for stack in STACKS:
    for i in range(cfg.depth):
      b = f"bert.{stack}.layer.{i}."
      for name in ("query", "key", "value"):
        add(b + f"attention.self.{name}.weight", d, d)
        add(b + f"attention.self.{name}.bias", d)
      add(b + "attention.output.dense.weight", d, d)
      add(b + "attention.output.dense.bias", d)
      add(b + "attention.output.LayerNorm.weight", d)
      add(b + "attention.output.LayerNorm.bias", d)
      add(b + "intermediate.dense.weight", f, d)
      add(b + "intermediate.dense.bias", f)
      add(b + "output.dense.weight", d, f)
      add(b + "output.dense.bias", d)
      add(b + "output.LayerNorm.weight", d)
      add(b + "output.LayerNorm.bias", d)
  add("bert.pooler.dense.weight", d, d)
  add("bert.pooler.dense.bias", d)
  add("bert.img_embedding.weight", d, cfg.region_dim)
  add("bert.img_embedding.bias", d)


def tied_keys(cfg: MvptrConfig) -> tuple[str, ...]:
  """The decoder names tied to the table: the pre-training MLM heads only (the VQA class's
  `cls.predictions.decoder` is a matrix of its own)."""
  return TIED if cfg.heads == "pretrain" else ()


def count_parameters(spec, tied: tuple[str, ...] = TIED) -> int:
  """Learned scalars of a spec (the `tied` decoder names are not parameters of their own)."""
  return sum(int(np.prod(s, dtype=np.int64)) for k, (s, _) in spec.items() if k not in tied)


def mvptr_param_shapes(cfg: MvptrConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{our dotted path: (shape, dtype)} of every parameter of `MVPTR(cfg)`."""
  d, f, n, h = cfg.width, cfg.mlp_dim, cfg.depth, cfg.num_heads
  dt = np.dtype(cfg.param_dtype)
  out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

  def add(path, *shape):
    out[path] = (tuple(shape), dt)

  add("embeddings.word", cfg.vocab_size, d)
  add("embeddings.position", cfg.max_positions, d)
  add("embeddings.token_type", cfg.type_vocab_size, d)
  add("embeddings.norm.scale", d)
  add("embeddings.norm.bias", d)
  add("img_embedding.kernel", cfg.region_dim, d)
  add("img_embedding.bias", d)
  for stack in STACKS:
    s = f"{stack}.layers."
    for name in ("query", "key", "value"):
      add(s + f"attn.{name}.kernel", n, d, h, d // h)
      add(s + f"attn.{name}.bias", n, h, d // h)
    add(s + "attn.out.kernel", n, h, d // h, d)
    add(s + "attn.out.bias", n, d)
    add(s + "mlp.fc1.kernel", n, d, f)
    add(s + "mlp.fc1.bias", n, f)
    add(s + "mlp.fc2.kernel", n, f, d)
    add(s + "mlp.fc2.bias", n, d)
    for norm in ("attn_norm", "mlp_norm"):
      add(s + f"{norm}.scale", n, d)
      add(s + f"{norm}.bias", n, d)
  add("pooler.kernel", d, d)
  add("pooler.bias", d)
  add("txt_proj", d, d)
  add("vis_proj", d, d)
  if cfg.heads in ("pretrain", "retrieval"):
    add("logit_scale")
  heads = ()
  if cfg.heads == "pretrain":
    add("itm_head.kernel", d, cfg.itm_classes)
    add("itm_head.bias", cfg.itm_classes)
    heads = ("mlm_head", "tag_mlm_head") + (("phrase_mlm_head",) if cfg.phrase_head else ())
    if cfg.qa_answers > 0:
      add("qa_head.kernel", d, cfg.qa_answers)
      add("qa_head.bias", cfg.qa_answers)
  elif cfg.heads == "vqa":
    heads = ("vqa_head",)
    add("vqa_head.decoder", cfg.qa_answers, d)
  else:
    add("classifier.kernel", d, cfg.classifier_labels)
    add("classifier.bias", cfg.classifier_labels)
  sizes = {"phrase_mlm_head": cfg.vocab_size, "vqa_head": cfg.qa_answers}
  for head in heads:
    add(f"{head}.bias", sizes.get(head, cfg.word_vocab_size))
    add(f"{head}.dense.kernel", d, d)
    add(f"{head}.dense.bias", d)
    add(f"{head}.norm.scale", d)
    add(f"{head}.norm.bias", d)
  return out
