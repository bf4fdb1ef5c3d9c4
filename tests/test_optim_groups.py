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
NO_DECAY_SUBSTRINGS = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
                       "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight")

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
    "text.layers.attn.query.kernel":
        "text_encoder.bert.encoder.layer.0.attention.self.query.weight",
    "text.layers.attn_norm.scale":
        "text_encoder.bert.encoder.layer.0.attention.output.LayerNorm.weight",
    "text.layers.mlp_norm.scale": "text_encoder.bert.encoder.layer.0.output.LayerNorm.weight",
    "fusion.layers.cross_attn.key.kernel":
        "text_encoder.bert.encoder.layer.12.crossattention.self.key.weight",
    "fusion.layers.cross_norm.scale":
        "text_encoder.bert.encoder.layer.12.crossattention.output.LayerNorm.weight",
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


def _table_tree(cfg: ModelConfig):
  """Abstract base tree built from the docs/architecture.md table (fallback without the model)."""
  v, t, f = cfg.vision, cfg.text, cfg.fusion
  dv, dt, hv, ht = v.width, t.width, v.num_heads, t.num_heads
  dhv, dht = dv // hv, dt // ht
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)

  def attn(n, d_kv):
    return {name: {"kernel": s(n, d_kv if name in ("key", "value") else dt, ht, dht),
                   "bias": s(n, ht, dht)} for name in ("query", "key", "value")} | {
                       "out": {"kernel": s(n, ht, dht, dt), "bias": s(n, dt)}}

  def norm(n=None, d=dt):
    pre = () if n is None else (n,)
    return {"scale": s(*pre, d), "bias": s(*pre, d)}

  def mlp(n, d, hidden):
    return {"fc1": {"kernel": s(n, d, hidden), "bias": s(n, hidden)},
            "fc2": {"kernel": s(n, hidden, d), "bias": s(n, d)}}

  def head(out):
    return {"fc1": {"kernel": s(dt, 2 * dt), "bias": s(2 * dt)}, "norm": norm(d=2 * dt),
            "fc2": {"kernel": s(2 * dt, out), "bias": s(out)}}

  nv, nt, nf = v.depth, t.depth, f.depth
  return {
      "vision": {
          "patch_embed": {"kernel": s(16, 16, 3, dv), "bias": s(dv)},
          "cls_token": s(1, 1, dv),
          "blocks": {
              "norm1": norm(nv, dv), "norm2": norm(nv, dv),
              "attn": {"qkv": {"kernel": s(nv, dv, 3, hv, dhv)}, "q_bias": s(nv, hv, dhv),
                       "v_bias": s(nv, hv, dhv), "rel_pos_bias": s(nv, v.num_rel, hv),
                       "proj": {"kernel": s(nv, hv, dhv, dv), "bias": s(nv, dv)}},
              "gamma_1": s(nv, dv), "gamma_2": s(nv, dv), "mlp": mlp(nv, dv, v.mlp_dim)},
          "fc_norm": norm(d=dv)},
      "text": {
          "embeddings": {"word": s(t.vocab_size, dt), "position": s(t.max_positions, dt),
                         "token_type": s(2, dt), "norm": norm()},
          "layers": {"attn": attn(nt, dt), "attn_norm": norm(nt), "mlp_norm": norm(nt),
                     "mlp": mlp(nt, dt, t.mlp_dim)}},
      "fusion": {"layers": {"self_attn": attn(nf, dt), "cross_attn": attn(nf, dv),
                            "self_norm": norm(nf), "cross_norm": norm(nf), "mlp_norm": norm(nf),
                            "mlp": mlp(nf, dt, f.mlp_dim)}},
      "vision_proj": {"kernel": s(dv, cfg.embed_dim), "bias": s(cfg.embed_dim)},
      "text_proj": {"kernel": s(dt, cfg.embed_dim), "bias": s(cfg.embed_dim)},
      "temp": s(),
      "itm_head": head(2),
      "box_head": head(4),
      "mlm_head": {"dense": {"kernel": s(dt, dt), "bias": s(dt)}, "norm": norm(),
                   "bias": s(t.vocab_size)},
  }


@pytest.fixture(scope="module")
def base_tree():
  """The real base model's abstract Param state when the model exists, else the table tree."""
  cfg = ModelConfig.base()
  try:
    from flax import nnx
    from x2vlm_jax.models.x2vlm import abstract_model
  except ImportError:
    return _table_tree(cfg)
  return nnx.state(abstract_model(cfg), nnx.Param)


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
  fresh_decay = 2 * D * E + 1 + (D * 2 * D + 2 * D + 2 * D * 2) + (D * 2 * D + 2 * D + 2 * D * 4) \
      + 6 * 4 * D * D  # projections, temp, itm/box kernels + head LN scale, cross-attn kernels
  fresh_no_decay = 2 * E + (2 * D + 2 * D + 2) + (2 * D + 2 * D + 4) + 6 * 4 * D + 6 * 2 * D
  base_decay = (16 * 16 * 3 * D + D + 12 * (3 * D * D + D * D + 2 * D + 2 * D * 3072)
                + V * D + 512 * D + 2 * D + 12 * (4 * D * D + 2 * D * 3072)
                + 6 * (4 * D * D + 2 * D * 3072) + D * D)
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
  assert names == pytest.approx({"vision/decay": 0.1, "vision/no_decay": 0.1, "text/decay": 0.2,
                                 "text/no_decay": 0.2, "fusion/decay": 0.2,
                                 "fusion/no_decay": 0.2, "fresh/decay": 2.0,
                                 "fresh/no_decay": 2.0})
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
