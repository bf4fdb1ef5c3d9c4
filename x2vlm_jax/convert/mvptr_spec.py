"""What an official MVPTR pre-training state dict holds, and our parameter shapes (pure NumPy).

- `mvptr_state_spec(cfg)`: every entry of the state dict of the official
  `BiBertImgForPreTraining` (Junction4Nako/mvp_pytorch, `oscar/modeling/modeling_vlbert.py`) --
  key, PyTorch shape, in `state_dict()` order (a module's own parameters before its sub-modules,
  sub-modules in registration order: `bert.txt_proj`, `bert.vis_proj`, then `embeddings`,
  `vis_encoder`, `txt_encoder`, `mul_encoder`, `pooler`, `img_embedding`; then `cls`,
  `half_mlm`, `qa_head`). The old `pytorch_transformers` BertEmbeddings has no `position_ids`
  buffer, so the file holds no buffers.
- `mvptr_param_shapes(cfg)`: our side, {dotted path: (shape, dtype)}; tests/test_mvptr_convert.py
  checks it against `nnx.eval_shape` of the real model.
- `TIED`: the two decoder weights, tied to the first `word_vocab_size` rows of the table.
"""

from __future__ import annotations

import collections

import numpy as np

from x2vlm_jax.models.mvptr_config import MvptrConfig

F32 = np.dtype(np.float32)
STACKS = ("vis_encoder", "txt_encoder", "mul_encoder")  # official registration order
TIED = ("cls.predictions.decoder.weight", "half_mlm.decoder.weight")


def mvptr_state_spec(cfg: MvptrConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Ordered {official key: (PyTorch shape, float32)} for `cfg`."""
  d, f, vw = cfg.width, cfg.mlp_dim, cfg.word_vocab_size
  spec: dict[str, tuple[tuple[int, ...], np.dtype]] = collections.OrderedDict()

  def add(key, *shape):
    spec[key] = (tuple(shape), F32)

  add("logit_scale")
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
  for head in ("cls.predictions.", "half_mlm."):
    add(head + "bias", vw)  # own parameter, before the transform sub-module
    add(head + "transform.dense.weight", d, d)
    add(head + "transform.dense.bias", d)
    add(head + "transform.LayerNorm.weight", d)
    add(head + "transform.LayerNorm.bias", d)
    add(head + "decoder.weight", vw, d)  # tied to the word rows (no decoder bias)
    if head == "cls.predictions.":
      add("cls.seq_relationship.weight", cfg.itm_classes, d)
      add("cls.seq_relationship.bias", cfg.itm_classes)
  if cfg.qa_answers > 0:
    add("qa_head.weight", cfg.qa_answers, d)
    add("qa_head.bias", cfg.qa_answers)
  return spec


def count_parameters(spec) -> int:
  """Learned scalars of a spec (the tied decoder names are not parameters of their own)."""
  return sum(int(np.prod(s, dtype=np.int64)) for k, (s, _) in spec.items() if k not in TIED)


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
  add("logit_scale")
  add("itm_head.kernel", d, cfg.itm_classes)
  add("itm_head.bias", cfg.itm_classes)
  heads = ("mlm_head", "tag_mlm_head") + (("phrase_mlm_head",) if cfg.phrase_head else ())
  for head in heads:
    add(f"{head}.bias", cfg.vocab_size if head == "phrase_mlm_head" else cfg.word_vocab_size)
    add(f"{head}.dense.kernel", d, d)
    add(f"{head}.dense.bias", d)
    add(f"{head}.norm.scale", d)
    add(f"{head}.norm.bias", d)
  if cfg.qa_answers > 0:
    add("qa_head.kernel", d, cfg.qa_answers)
    add("qa_head.bias", cfg.qa_answers)
  return out
