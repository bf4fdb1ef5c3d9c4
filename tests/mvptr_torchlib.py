"""The MVPTR forward written with transformers' PyTorch BERT pieces (embeddings, BertLayer,
BertPooler), loaded with our tiny model's weights: the parity reference of test_mvptr_model."""

from __future__ import annotations

import numpy as np

from x2vlm_jax.models.mvptr_config import MvptrConfig


def _t(torch, x):
  return torch.from_numpy(np.array(x, np.float32))


def _linear(torch, lin, kernel, bias):
  """Our kernel [in..., out...] flattened to a PyTorch (out, in) weight."""
  k = np.asarray(kernel)
  fan_in = lin.weight.shape[1]
  lin.weight.data = _t(torch, k.reshape(fan_in, -1).T)
  lin.bias.data = _t(torch, np.asarray(bias).reshape(-1))


def _ln(torch, ln, ours):
  ln.weight.data = _t(torch, ours.scale[...])
  ln.bias.data = _t(torch, ours.bias[...])


def load_stack(torch, layers, stack):
  """Our stacked `Stack` -> a list of transformers BertLayer."""
  s = stack.layers
  for i, layer in enumerate(layers):
    att = layer.attention
    for name in ("query", "key", "value"):
      dense = getattr(s.attn, name)
      _linear(torch, getattr(att.self, name), dense.kernel[...][i], dense.bias[...][i])
    _linear(torch, att.output.dense, s.attn.out.kernel[...][i], s.attn.out.bias[...][i])
    att.output.LayerNorm.weight.data = _t(torch, s.attn_norm.scale[...][i])
    att.output.LayerNorm.bias.data = _t(torch, s.attn_norm.bias[...][i])
    _linear(torch, layer.intermediate.dense, s.mlp.fc1.kernel[...][i], s.mlp.fc1.bias[...][i])
    _linear(torch, layer.output.dense, s.mlp.fc2.kernel[...][i], s.mlp.fc2.bias[...][i])
    layer.output.LayerNorm.weight.data = _t(torch, s.mlp_norm.scale[...][i])
    layer.output.LayerNorm.bias.data = _t(torch, s.mlp_norm.bias[...][i])


def _run(torch, layers, h, mask):
  """BertLayers with BERT's additive -10000 mask; returns every layer's output."""
  ext = (1.0 - _t(torch, mask))[:, None, None, :] * -10000.0
  outs = []
  for layer in layers:
    out = layer(h, attention_mask=ext)
    h = out[0] if isinstance(out, tuple) else out
    outs.append(h)
  return outs


def reference_forward(model, cfg: MvptrConfig, x, torch) -> dict:
  from transformers import BertConfig
  from transformers.models.bert import modeling_bert as mb

  bc = BertConfig(
    vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
    num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim, hidden_act="gelu",
    max_position_embeddings=cfg.max_positions, type_vocab_size=cfg.type_vocab_size,
    layer_norm_eps=cfg.ln_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    attn_implementation="eager",
  )  # fmt: skip
  emb = mb.BertEmbeddings(bc).eval()
  e = model.embeddings
  emb.word_embeddings.weight.data = _t(torch, e.word[...])
  emb.position_embeddings.weight.data = _t(torch, e.position[...])
  emb.token_type_embeddings.weight.data = _t(torch, e.token_type[...])
  _ln(torch, emb.LayerNorm, e.norm)
  stacks = {}
  for name in ("txt", "vis", "mul"):
    layers = [mb.BertLayer(bc, layer_idx=i).eval() for i in range(cfg.depth)]
    load_stack(torch, layers, getattr(model, f"{name}_encoder"))
    stacks[name] = layers
  img = torch.nn.Linear(cfg.region_dim, cfg.width)
  _linear(torch, img, model.img_embedding.kernel[...], model.img_embedding.bias[...])
  pooler = mb.BertPooler(bc).eval()
  _linear(torch, pooler.dense, model.pooler.kernel[...], model.pooler.bias[...])
  with torch.no_grad():
    return _forward(torch, emb, stacks, img, pooler, cfg, x)


def _forward(torch, emb, stacks, img, pooler, cfg, x) -> dict:
  ids = torch.from_numpy(np.asarray(x["ids"], np.int64))
  tags = torch.from_numpy(np.asarray(x["tag_ids"], np.int64))
  a = emb(input_ids=ids, token_type_ids=torch.zeros_like(ids))
  b = torch.cat(
    [emb(input_ids=tags, token_type_ids=torch.ones_like(tags)), img(_t(torch, x["regions"]))], 1
  )
  b_mask = np.concatenate([x["t_mask"], x["r_mask"]], 1)
  text = _run(torch, stacks["txt"], a, x["a_mask"])[-1]
  vis = _run(torch, stacks["vis"], b, b_mask)[-1]
  j_in = torch.cat([text, vis[:, tags.shape[1] :]], 1)
  j_mask = np.concatenate([x["a_mask"], x["r_mask"]], 1)
  joint = _run(torch, stacks["mul"], j_in, j_mask)
  n = lambda v: v.numpy()  # noqa: E731
  return dict(
    text=n(text), vision=n(vis), joint=n(joint[-1]), pooled=n(pooler(joint[-1])),
    mid=n(joint[cfg.phrase_layer]), txt_in=n(a), txt_mask=x["a_mask"], txt_out=n(text),
    vis_in=n(b), vis_mask=b_mask, vis_out=n(vis), mul_in=n(j_in), mul_mask=j_mask,
    mul_out=n(joint[-1]),
  )  # fmt: skip
