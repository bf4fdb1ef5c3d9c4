"""Model structure: parameter counts of the real variants, the logical-name contract of
docs/architecture.md, sharded construction on 1- and 8-device meshes, the init scheme, and the
bfloat16 / remat switches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from x2vlm_jax import sharding, treepath
from x2vlm_jax.models import ModelConfig, abstract_model, count_params, create_sharded

FAST_KEY = dict(impl="unsafe_rbg")  # RngBitGenerator: compiles far faster than threefry on CPU


def test_param_counts_match_official():
  assert count_params(ModelConfig.base()) == 254_758_401
  assert count_params(ModelConfig.large()) == 592_952_129


# A representative slice of the table in docs/architecture.md (shapes for the tiny config).
CONTRACT = {
  "vision.patch_embed.kernel": ((16, 16, 3, 36), ("patch", "patch", "patch", "embed")),
  "vision.cls_token": ((1, 1, 36), (None, None, "embed")),
  "vision.blocks.attn.qkv.kernel": ((2, 36, 3, 3, 12), ("layers", "embed", "qkv", "heads", "kv")),
  "vision.blocks.attn.q_bias": ((2, 3, 12), ("layers", "heads", "kv")),
  "vision.blocks.attn.rel_pos_bias": ((2, 52, 3), ("layers", "rel_pos", "heads")),
  "vision.blocks.attn.proj.kernel": ((2, 3, 12, 36), ("layers", "heads", "kv", "embed")),
  "vision.blocks.gamma_1": ((2, 36), ("layers", "embed")),
  "vision.blocks.mlp.fc2.kernel": ((2, 52, 36), ("layers", "mlp", "embed")),
  "vision.fc_norm.scale": ((36,), ("norm",)),
  "text.embeddings.word": ((30522, 40), ("vocab", "embed")),
  "text.embeddings.position": ((64, 40), ("positions", "embed")),
  "text.embeddings.token_type": ((2, 40), (None, "embed")),
  "text.layers.attn.query.kernel": ((2, 40, 4, 10), ("layers", "embed", "heads", "kv")),
  "text.layers.attn.out.kernel": ((2, 4, 10, 40), ("layers", "heads", "kv", "embed")),
  "text.layers.attn_norm.scale": ((2, 40), ("layers", "norm")),
  "fusion.layers.cross_attn.key.kernel": ((2, 36, 4, 10), ("layers", "embed", "heads", "kv")),
  "fusion.layers.cross_norm.bias": ((2, 40), ("layers", "norm")),
  "vision_proj.kernel": ((36, 24), ("embed", "proj")),
  "temp": ((), ()),
  "itm_head.fc2.kernel": ((80, 2), ("mlp", "classes")),
  "box_head.fc2.bias": ((4,), ("classes",)),
  "mlm_head.dense.kernel": ((40, 40), ("embed", "embed")),
  "mlm_head.bias": ((30522,), ("vocab",)),
  "frame_embed": ((3, 36), ("frames", "embed")),
}


def test_logical_names_follow_contract_and_rules():
  state = nnx.state(abstract_model(ModelConfig.tiny(frame_len=3)), nnx.Param)
  assert sharding.check_rules_cover(state) == []
  flat = treepath.flatten_state(state)
  assert len(flat) == 91
  for path, (shape, names) in CONTRACT.items():
    assert flat[path].shape == shape, path
    assert sharding._names_of(flat[path]) == names, path
  # Every stacked tower parameter carries the 'layers' axis first.
  for path, var in flat.items():
    if ".blocks." in path or ".layers." in path:
      assert sharding._names_of(var)[0] == "layers", path
  assert "frame_embed" not in treepath.flatten_state(nnx.state(abstract_model(ModelConfig.tiny())))


@pytest.fixture(scope="module")
def sharded8():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  return mesh, create_sharded(ModelConfig.tiny(frame_len=2), mesh, jax.random.key(0, **FAST_KEY))


def test_params_born_sharded_on_8_devices(sharded8):
  mesh, model = sharded8
  state = nnx.state(model, nnx.Param)
  want = sharding.state_shardings(state, mesh)
  for (path, var), (_, sh) in zip(nnx.to_flat_state(state), nnx.to_flat_state(want)):
    assert var[...].sharding.is_equivalent_to(sh, var[...].ndim), path
  word = model.text.embeddings.word[...]
  assert word.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert {s.data.shape for s in word.addressable_shards} == {(30522, 10)}  # 40 / fsdp 4
  q = model.text.layers.attn.query.kernel[...]  # [layers, embed, heads, kv]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_init_scheme(sharded8):
  _, m = sharded8
  v = lambda x: np.asarray(x[...])
  assert np.all(v(m.vision.blocks.gamma_1) == np.float32(0.1))
  assert np.all(v(m.vision.blocks.attn.rel_pos_bias) == 0) and np.all(
    v(m.vision.blocks.attn.q_bias) == 0
  )
  assert np.all(v(m.vision.blocks.norm1.scale) == 1) and np.all(v(m.vision.fc_norm.bias) == 0)
  assert v(m.temp) == np.float32(0.07)
  # BEiT fix_init_weight: block i's proj / fc2 scaled by 1/sqrt(2(i+1)), from trunc-normal 0.02.
  fc2 = v(m.vision.blocks.mlp.fc2.kernel)  # [2, 52, 36]
  assert abs(fc2[0].std() / (0.02 / math.sqrt(2)) - 1) < 0.1
  assert abs(fc2[0].std() / fc2[1].std() - math.sqrt(2)) < 0.15
  assert abs(v(m.vision.blocks.attn.qkv.kernel).std() / 0.02 - 1) < 0.1
  # BERT: normal(0.02) weights, zero biases (cross-attention included).
  assert abs(v(m.fusion.layers.cross_attn.key.kernel).std() / 0.02 - 1) < 0.1
  assert np.all(v(m.fusion.layers.cross_attn.key.bias) == 0)
  assert abs(v(m.text.embeddings.word).std() / 0.02 - 1) < 0.02
  assert np.all(v(m.text.embeddings.word)[0] == 0)  # [PAD] row (padding_idx)
  # Heads: PyTorch Linear default, U(+-1/sqrt(fan_in)) for weight and bias.
  w, b = v(m.itm_head.fc1.kernel), v(m.itm_head.fc1.bias)
  bound = 1 / math.sqrt(40)
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
  assert np.abs(b).max() <= bound and np.abs(b).std() > 0
  assert abs(v(m.frame_embed).std() / 0.02 - 1) < 0.2


def test_build_on_one_device_mesh_runs_bf16_and_remat():
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  cfg = ModelConfig.tiny(dtype=jnp.bfloat16, remat=True)
  model = create_sharded(cfg, mesh, jax.random.key(1, **FAST_KEY))
  assert model.text.layers.attn.query.kernel[...].dtype == jnp.float32  # params stay float32
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 500, (2, 5)), jnp.int32)
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.int32)

  def loss(m):
    out = m.encode_text(ids, mask, jax.random.key(2))
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  (_, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  assert out.dtype == jnp.bfloat16  # compute dtype; LayerNorm/softmax statistics run in float32
  g = grads.text.layers.mlp.fc1.kernel[...]
  assert g.dtype == jnp.float32 and g.shape == (2, 40, 56) and bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(g).max()) > 0


def test_activation_constraints_under_mesh(sharded8):
  mesh, model = sharded8
  ids = jax.device_put(jnp.ones((8, 5), jnp.int32), sharding.batch_sharding(mesh, 2))
  fwd = nnx.jit(lambda m, i: m.encode_text(i, i))
  with jax.set_mesh(mesh):  # constraints active: batch axis over ('data', 'fsdp')
    out = fwd(model, ids)
  assert out.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  np.testing.assert_allclose(np.asarray(out), np.asarray(fwd(model, ids)), atol=1e-5)


def test_sincos_position_embedding_init():
  """pos_embed_init='sincos': the cls row is zero, patch (row y, col x) holds sin/cos of x in the
  first half of the channels and of y in the second, frequency 1 in the first pair."""
  from x2vlm_jax.models.config import VisionConfig
  from x2vlm_jax.models.vision import VisionTower

  cfg = VisionConfig(
    width=36,
    depth=1,
    num_heads=3,
    mlp_dim=52,
    image_size=64,
    abs_pos_embed=True,
    pos_embed_init="sincos",
  )
  table = np.asarray(VisionTower(cfg, rngs=nnx.Rngs(0)).pos_embed[...])[0]  # [1 + 16, 36]
  assert table.shape == (17, 36) and np.all(table[0] == 0)
  q = 36 // 4
  for t, (y, x) in enumerate([(0, 0), (0, 3), (2, 1), (3, 3)]):
    row = table[1 + 4 * y + x]
    np.testing.assert_allclose(
      row[[0, q, 2 * q, 3 * q]], [np.sin(x), np.cos(x), np.sin(y), np.cos(y)], atol=1e-6
    )
  assert len({tuple(np.round(r, 5)) for r in table[1:]}) == 16  # every patch distinct
  with pytest.raises(ValueError, match="pos_embed_init"):
    VisionTower(
      VisionConfig(
        width=36,
        depth=1,
        num_heads=3,
        mlp_dim=52,
        image_size=64,
        abs_pos_embed=True,
        pos_embed_init="learned",
      ),
      rngs=nnx.Rngs(0),
    )
