"""Parameter groups of the base model: weight decay and lr x 2 exactly as the official code.

The official rules: docs/fidelity.md#weight-decay-by-substring,
docs/fidelity.md#learning-rate-multiplier-for-fresh-parameters.
"""

import math

import jax
import jax.numpy as jnp
import pytest

from x2vlm_jax import optim, treepath
from x2vlm_jax.models.config import ModelConfig

# The official no-decay substrings, used here only to cross-check the rule table.
NO_DECAY_SUBSTRINGS = (
  "bias",
  "LayerNorm.bias",
  "LayerNorm.weight",
  "norm.bias",
  "norm.weight",
  "norm1.bias",
  "norm1.weight",
  "norm2.bias",
  "norm2.weight",
)

# Our path -> the official name of the same tensor (layer index dropped: the rule ignores it).
OFFICIAL_NAME = {
  "vision.cls_token": "vision_encoder.cls_token",
  "vision.patch_embed.kernel": "vision_encoder.patch_embed.proj.weight",
  "vision.patch_embed.bias": "vision_encoder.patch_embed.proj.bias",
  "vision.blocks.gamma_1": "vision_encoder.blocks.0.gamma_1",
  "vision.blocks.gamma_2": "vision_encoder.blocks.0.gamma_2",
  "vision.blocks.norm1.scale": "vision_encoder.blocks.0.norm1.weight",
  "vision.blocks.norm2.bias": "vision_encoder.blocks.0.norm2.bias",
  "vision.blocks.attn.q_bias": "vision_encoder.blocks.0.attn.q_bias",
  "vision.blocks.attn.rel_pos_bias": "vision_encoder.blocks.0.attn.relative_position_bias_table",
  "vision.blocks.attn.qkv.kernel": "vision_encoder.blocks.0.attn.qkv.weight",
  "vision.fc_norm.scale": "vision_encoder.fc_norm.weight",
  "text.embeddings.word": "text_encoder.bert.embeddings.word_embeddings.weight",
  "text.embeddings.norm.scale": "text_encoder.bert.embeddings.LayerNorm.weight",
  "text.layers.attn.query.kernel": "text_encoder.bert.encoder.layer.0.attention.self.query.weight",
  "text.layers.attn_norm.scale": "text_encoder.bert.encoder.layer.0.attention.output.LayerNorm.weight",  # noqa: E501
  "text.layers.mlp_norm.scale": "text_encoder.bert.encoder.layer.0.output.LayerNorm.weight",
  "fusion.layers.cross_attn.key.kernel": "text_encoder.bert.encoder.layer.12.crossattention.self.key.weight",  # noqa: E501
  "fusion.layers.cross_norm.scale": "text_encoder.bert.encoder.layer.12.crossattention.output.LayerNorm.weight",  # noqa: E501
  "mlm_head.bias": "text_encoder.cls.predictions.bias",
  "mlm_head.norm.scale": "text_encoder.cls.predictions.transform.LayerNorm.weight",
  "mlm_head.dense.kernel": "text_encoder.cls.predictions.transform.dense.weight",
  "temp": "temp",
  "itm_head.fc1.kernel": "itm_head.0.weight",
  "itm_head.norm.scale": "itm_head.1.weight",
  "itm_head.norm.bias": "itm_head.1.bias",
  "box_head.norm.scale": "bbox_head.1.weight",
  "vision_proj.kernel": "vision_proj.weight",
}


def _s(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _attn(n, d_kv, dt, ht, dht):
  qkv = {
    name: {
      "kernel": _s(n, d_kv if name in ("key", "value") else dt, ht, dht),
      "bias": _s(n, ht, dht),
    }
    for name in ("query", "key", "value")
  }
  return qkv | {"out": {"kernel": _s(n, ht, dht, dt), "bias": _s(n, dt)}}


def _norm(n, d):
  pre = () if n is None else (n,)
  return {"scale": _s(*pre, d), "bias": _s(*pre, d)}


def _mlp(n, d, hidden):
  return {
    "fc1": {"kernel": _s(n, d, hidden), "bias": _s(n, hidden)},
    "fc2": {"kernel": _s(n, hidden, d), "bias": _s(n, d)},
  }


def _head(dt, out):
  return {
    "fc1": {"kernel": _s(dt, 2 * dt), "bias": _s(2 * dt)},
    "norm": _norm(None, 2 * dt),
    "fc2": {"kernel": _s(2 * dt, out), "bias": _s(out)},
  }


def _vision_tree(v):
  dv, hv, nv = v.width, v.num_heads, v.depth
  dhv = dv // hv
  return {
    "patch_embed": {"kernel": _s(16, 16, 3, dv), "bias": _s(dv)},
    "cls_token": _s(1, 1, dv),
    "blocks": {
      "norm1": _norm(nv, dv),
      "norm2": _norm(nv, dv),
      "attn": {
        "qkv": {"kernel": _s(nv, dv, 3, hv, dhv)},
        "q_bias": _s(nv, hv, dhv),
        "v_bias": _s(nv, hv, dhv),
        "rel_pos_bias": _s(nv, v.num_rel, hv),
        "proj": {"kernel": _s(nv, hv, dhv, dv), "bias": _s(nv, dv)},
      },
      "gamma_1": _s(nv, dv),
      "gamma_2": _s(nv, dv),
      "mlp": _mlp(nv, dv, v.mlp_dim),
    },
    "fc_norm": _norm(None, dv),
  }


def _table_tree(cfg: ModelConfig):
  """Abstract base tree restated from the docs/architecture.md table (independent of the model
  code, so a shape mistake in either shows up as a size mismatch)."""
  v, t, f = cfg.vision, cfg.text, cfg.fusion
  dv, dt, ht = v.width, t.width, t.num_heads
  dht, nt, nf = dt // ht, t.depth, f.depth
  return {
    "vision": _vision_tree(v),
    "text": {
      "embeddings": {
        "word": _s(t.vocab_size, dt),
        "position": _s(t.max_positions, dt),
        "token_type": _s(2, dt),
        "norm": _norm(None, dt),
      },
      "layers": {
        "attn": _attn(nt, dt, dt, ht, dht),
        "attn_norm": _norm(nt, dt),
        "mlp_norm": _norm(nt, dt),
        "mlp": _mlp(nt, dt, t.mlp_dim),
      },
    },
    "fusion": {
      "layers": {
        "self_attn": _attn(nf, dt, dt, ht, dht),
        "cross_attn": _attn(nf, dv, dt, ht, dht),
        "self_norm": _norm(nf, dt),
        "cross_norm": _norm(nf, dt),
        "mlp_norm": _norm(nf, dt),
        "mlp": _mlp(nf, dt, f.mlp_dim),
      }
    },
    "vision_proj": {"kernel": _s(dv, cfg.embed_dim), "bias": _s(cfg.embed_dim)},
    "text_proj": {"kernel": _s(dt, cfg.embed_dim), "bias": _s(cfg.embed_dim)},
    "temp": _s(),
    "itm_head": _head(dt, 2),
    "box_head": _head(dt, 4),
    "mlm_head": {
      "dense": {"kernel": _s(dt, dt), "bias": _s(dt)},
      "norm": _norm(None, dt),
      "bias": _s(t.vocab_size),
    },
  }


@pytest.fixture(scope="module")
def base_tree():
  """The base model's abstract Param state."""
  from flax import nnx

  from x2vlm_jax.models.x2vlm import abstract_model

  return nnx.state(abstract_model(ModelConfig.base()), nnx.Param)


def _groups(tree, cfg, fresh):
  out = {}
  for path, leaf in treepath.flatten(tree):
    g = optim.param_group(path, fresh, cfg)
    n_t, n_p = out.get(g, (0, 0))
    out[g] = (n_t + 1, n_p + math.prod(leaf.shape))
  return out


def test_table_tree_matches_documented_size():
  tree = _table_tree(ModelConfig.base())
  assert sum(math.prod(l.shape) for _, l in treepath.flatten(tree)) == 254_758_401


def test_base_groups_counts(base_tree):
  cfg = optim.OptimConfig(total_steps=10)
  fresh = optim.from_scratch_fresh_paths(base_tree)
  assert "frame_embed" not in fresh and "fusion.layers.cross_attn" in fresh
  groups = {g.name: (g, n) for g, n in _groups(base_tree, cfg, fresh).items()}
  assert set(groups) == {"base/decay", "base/no_decay", "fresh/decay", "fresh/no_decay"}
  D, E, V = 768, 256, 30522
  fresh_decay = (
    2 * D * E
    + 1
    + (D * 2 * D + 2 * D + 2 * D * 2)
    + (D * 2 * D + 2 * D + 2 * D * 4)
    + 6 * 4 * D * D
  )  # projections, temp, itm/box kernels + head LN scale, cross-attn kernels
  fresh_no_decay = 2 * E + (2 * D + 2 * D + 2) + (2 * D + 2 * D + 4) + 6 * 4 * D + 6 * 2 * D
  base_decay = (
    16 * 16 * 3 * D
    + D
    + 12 * (3 * D * D + D * D + 2 * D + 2 * D * 3072)
    + V * D
    + 512 * D
    + 2 * D
    + 12 * (4 * D * D + 2 * D * 3072)
    + 6 * (4 * D * D + 2 * D * 3072)
    + D * D
  )
  base_no_decay = 254_758_401 - fresh_decay - fresh_no_decay - base_decay
  assert groups["fresh/decay"][1] == (13, fresh_decay)
  assert groups["fresh/no_decay"][1] == (14, fresh_no_decay)
  assert groups["base/decay"][1] == (24, base_decay)
  assert groups["base/no_decay"][1] == (39, base_no_decay)
  assert groups["fresh/decay"][0] == optim.ParamGroup("fresh/decay", 2.0, 0.01)
  assert groups["base/no_decay"][0] == optim.ParamGroup("base/no_decay", 1.0, 0.0)


def test_named_examples_and_official_substring_rule(base_tree):
  cfg = optim.OptimConfig(total_steps=10)
  fresh = optim.from_scratch_fresh_paths(base_tree)
  paths = {p for p, _ in treepath.flatten(base_tree)}
  assert set(OFFICIAL_NAME) <= paths
  for ours, official in OFFICIAL_NAME.items():
    want_decay = not any(sub in official for sub in NO_DECAY_SUBSTRINGS)
    assert optim.decays(ours) == want_decay, (ours, official)
  group = lambda p: optim.param_group(p, fresh, cfg)
  assert group("vision.blocks.gamma_1").weight_decay == 0.01
  assert group("vision.blocks.attn.rel_pos_bias").weight_decay == 0.0
  assert group("itm_head.norm.scale").weight_decay == 0.01
  assert group("itm_head.norm.bias").weight_decay == 0.0
  assert group("temp") == optim.ParamGroup("fresh/decay", 2.0, 0.01)
  assert group("fusion.layers.cross_attn.query.kernel").lr_factor == 2.0
  assert group("fusion.layers.cross_norm.scale") == optim.ParamGroup("fresh/no_decay", 2.0, 0.0)
  assert group("fusion.layers.self_attn.query.kernel").lr_factor == 1.0
  assert group("mlm_head.bias") == optim.ParamGroup("base/no_decay", 1.0, 0.0)


def test_per_tower_rates_take_precedence(base_tree):
  cfg = optim.OptimConfig(lr=1e-4, vision_lr=1e-5, text_lr=2e-5, total_steps=10)
  fresh = optim.from_scratch_fresh_paths(base_tree)
  names = {g.name: g.lr_factor for g in _groups(base_tree, cfg, fresh)}
  assert names == pytest.approx(
    {
      "vision/decay": 0.1,
      "vision/no_decay": 0.1,
      "text/decay": 0.2,
      "text/no_decay": 0.2,
      "fusion/decay": 0.2,
      "fusion/no_decay": 0.2,
      "fresh/decay": 2.0,
      "fresh/no_decay": 2.0,
    }
  )
  # Cross-attention is fresh but follows the fusion (= text) rate; the MLM head follows text.
  assert optim.param_group("fusion.layers.cross_attn.key.kernel", fresh, cfg).name == "fusion/decay"
  assert optim.param_group("mlm_head.bias", fresh, cfg).name == "text/no_decay"


def test_report(base_tree):
  cfg = optim.OptimConfig(total_steps=10)
  report = optim.param_groups_report(base_tree, optim.from_scratch_fresh_paths(base_tree), cfg)
  lines = {line.split()[0]: line.split() for line in report.splitlines()[1:]}
  assert lines["fresh/decay"][1:] == ["13", "16,920,577", "2", "0.0002", "0.01"]
  assert lines["base/no_decay"][1:] == ["39", "432,378", "1", "0.0001", "0"]
  assert lines["total"][1:] == ["90", "254,758,401"]
