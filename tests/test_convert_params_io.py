"""params_io: our converted-weights directory (config JSON + orbax params), restored on the host
and sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2vlm_jax import params_io, sharding, treepath
from x2vlm_jax.convert import official as O
from x2vlm_jax.models.config import ModelConfig


def _random_params(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return treepath.unflatten_dict(
    {
      k: rng.standard_normal(s).astype(d)
      for k, (s, d) in treepath.flatten_dict(O.param_shapes(cfg)).items()
    }
  )


def test_config_json_round_trip():
  for cfg in (ModelConfig.tiny(frame_len=2), ModelConfig.large(dtype=jnp.bfloat16)):
    d = params_io.config_to_dict(cfg)
    assert d["dtype"] in ("float32", "bfloat16") and d["param_dtype"] == "float32"
    assert params_io.config_from_dict(d) == cfg
  with pytest.raises(ValueError, match="unknown ModelConfig fields"):
    params_io.config_from_dict({**params_io.config_to_dict(ModelConfig.tiny()), "widht": 3})


def test_save_load_host_and_sharded(tmp_path):
  cfg = ModelConfig.tiny()
  params = _random_params(cfg)
  params_io.save_params(tmp_path / "w", cfg, params)
  with pytest.raises(FileExistsError):
    params_io.save_params(tmp_path / "w", cfg, params)

  got_cfg, host = params_io.load_params(tmp_path / "w")
  assert got_cfg == cfg
  for k, v in treepath.flatten_dict(params).items():
    h = treepath.flatten_dict(host)[k]
    assert isinstance(h, np.ndarray) and h.dtype == v.dtype and np.array_equal(h, v), k

  # Restore straight into the model's abstract, sharded param state on an 8-device mesh.
  x2vlm = pytest.importorskip("x2vlm_jax.models.x2vlm")
  from flax import nnx

  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  graphdef, abstract_state, rest = nnx.split(x2vlm.abstract_model(cfg), nnx.Param, ...)
  shard_state = sharding.state_shardings(abstract_state, mesh)
  target = nnx.to_pure_dict(abstract_state)
  shardings = nnx.to_pure_dict(shard_state)
  _, restored = params_io.load_params(tmp_path / "w", abstract_target=target, shardings=shardings)
  flat_r, flat_s = treepath.flatten_dict(restored), treepath.flatten_dict(shardings)
  assert set(flat_r) == set(treepath.flatten_dict(params))
  n_split = 0
  for k, v in treepath.flatten_dict(params).items():
    arr = flat_r[k]
    assert isinstance(arr, jax.Array) and arr.sharding == flat_s[k], k
    assert np.array_equal(np.asarray(arr), v), k
    n_split += arr.addressable_shards[0].data.shape != arr.shape
  assert n_split > 10  # e.g. width 40 over fsdp=4, heads 4 over tensor=2: really sharded
  word = flat_r["text.embeddings.word"]  # [V, D] with vocab over tensor, embed over fsdp
  assert word.addressable_shards[0].data.shape == (cfg.text.vocab_size // 2, cfg.text.width // 4)
  # The restored tree plugs into the model.
  nnx.replace_by_pure_dict(abstract_state, restored)
  model = nnx.merge(graphdef, abstract_state, rest)
  assert float(model.temp[...]) == pytest.approx(float(params["temp"]))
