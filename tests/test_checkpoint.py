"""Tests of x2vlm_jax.checkpoint: round trips, retention, corruption fallback, crash safety,
restoring onto another mesh, and the config-change refusal (every file of a step, the moving
aside and the checks before reading: tests/test_checkpoint_integrity.py)."""

import glob
import os
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from x2vlm_jax import checkpoint as ck
from x2vlm_jax import checksums, ckpt_config
from x2vlm_jax.sharding import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(mesh, seed=0):
  """A small train-state-like pytree: sharded params, optimizer moments, step, PRNG key data."""
  rs = np.random.RandomState(seed)
  sh = NamedSharding(mesh, P("data"))
  rep = NamedSharding(mesh, P())
  # Random bits (finite floats): incompressible, so zstd stores them verbatim (corruption test).
  w = rs.randint(0, 2**32, size=(64, 97), dtype=np.uint64).astype(np.uint32).view(np.float32)
  w = np.where(np.isfinite(w), w, np.float32(1.0))
  return {
    "params": {
      "w": jax.device_put(w, sh),
      "b": jax.device_put(rs.randn(97).astype(np.float32), rep),
      "emb": jax.device_put(rs.randn(8, 5).astype(jnp.bfloat16), sh),
    },
    "opt": {"mu": jax.device_put(np.full((64, 97), 0.5, np.float32), sh), "count": jnp.int32(seed)},
    "step": jnp.int32(100 + seed),
    "rng": jax.random.key_data(jax.random.key(seed)),
    "host_counter": np.arange(3, dtype=np.int64),
  }


def _assert_tree_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def mesh8():
  return make_mesh({"data": 8})


def test_round_trip_async(tmp_path, mesh8, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  # Hold the commit of the step until we release it, to see that `save` returned before it.
  release = threading.Event()
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def held_finalize(self):
    assert release.wait(timeout=60)
    return await original(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", held_finalize)
  state = _state(mesh8)
  data_iter = {"image": {"next_index": 12, "epoch": 1}, "region": {"next_index": 3}}
  config = {"model": {"variant": "tiny", "depth": 3}, "seed": 42, "lr": 1e-4, "kinds": ("image",)}
  mgr = ck.CheckpointManager(tmp_path / "ckpt", async_save=True)
  assert mgr.save(7, state, data_iter=data_iter, config=config)
  assert mgr.all_steps() == []  # returned while the write is still pending
  release.set()
  mgr.wait_until_finished()
  assert mgr.all_steps() == [7]
  out = mgr.restore(ck.abstract_target(state))
  assert out.step == 7 and out.skipped == ()
  _assert_tree_equal(out.state, state)
  assert out.state["params"]["w"].sharding == state["params"]["w"].sharding
  assert out.data_iter == data_iter
  assert out.config == {
    "model": {"variant": "tiny", "depth": 3},
    "seed": 42,
    "lr": 1e-4,
    "kinds": ["image"],
  }
  assert mgr.saved_config() == out.config
  assert mgr.check_step(7).ok and (tmp_path / "ckpt" / "7" / "x2vlm_manifest.json").exists()
  mgr.close()


def test_retention_keep_n_and_every_k(tmp_path, mesh8):
  mgr = ck.CheckpointManager(tmp_path / "ckpt", max_to_keep=2, keep_every=3, async_save=True)
  state = {"x": jnp.arange(8.0)}
  for step in range(1, 9):
    mgr.save(step, state)
  mgr.wait_until_finished()
  # newest two (7, 8) plus every multiple of 3 (3, 6)
  assert mgr.all_steps() == [3, 6, 7, 8]
  assert sorted(
    int(os.path.basename(p))
    for p in glob.glob(str(tmp_path / "ckpt" / "*"))
    if os.path.basename(p).isdigit()
  ) == [3, 6, 7, 8]
  mgr.close()


def _flip_byte_in_array_data(step_dir, needle: bytes):
  """Flips one byte inside the stored bytes of an array (not in metadata or b-tree nodes).

  The leaf holds random bits, so zstd keeps it as a raw block and its bytes appear verbatim
  in the ocdbt data files; we find them there and flip a byte in the middle.
  """
  files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
  by_inode = {os.stat(f).st_ino: f for f in files}  # orbax hard-links some files: flip once
  hits = [(f, open(f, "rb").read()) for f in by_inode.values()]
  hits = [(f, data, data.find(needle)) for f, data in hits if needle in data]
  assert hits, "the array bytes were not found in any ocdbt data file"
  for path, data, offset in hits:  # orbax may hold a chunk in more than one data file
    data = bytearray(data)
    data[offset + len(needle) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_corrupt_latest_falls_back(tmp_path, mesh8):
  mgr = ck.CheckpointManager(tmp_path / "ckpt", async_save=False)
  s1, s2 = _state(mesh8, seed=1), _state(mesh8, seed=2)
  mgr.save(1, s1, data_iter={"image": {"i": 1}})
  mgr.save(2, s2, data_iter={"image": {"i": 2}})
  needle = np.asarray(s2["params"]["w"])[0, :8].tobytes()  # 32 bytes of the first shard
  _flip_byte_in_array_data(str(tmp_path / "ckpt" / "2"), needle)
  mgr2 = ck.CheckpointManager(tmp_path / "ckpt", async_save=False)
  out = mgr2.restore(ck.abstract_target(s1))
  assert out.step == 1 and out.data_iter == {"image": {"i": 1}}
  _assert_tree_equal(out.state, s1)
  assert len(out.skipped) == 1
  assert "step 2 is corrupt: file state/ocdbt.process_0/d/" in out.skipped[0], out.skipped
  assert "differs from its SHA-256" in out.skipped[0] and "moved aside" in out.skipped[0]
  assert mgr2.all_steps() == [1] and mgr2.moved_aside()[0].startswith("2.corrupt-")


def test_missing_files_reject_the_step(tmp_path, mesh8):
  mgr = ck.CheckpointManager(tmp_path / "ckpt", async_save=False)
  state = _state(mesh8)
  mgr.save(1, state)
  mgr.save(2, state)
  for f in glob.glob(str(tmp_path / "ckpt" / "2" / "state" / "ocdbt.process_*" / "d" / "*")):
    os.remove(f)
  with pytest.raises(ck.CheckpointError, match="no restorable checkpoint"):
    ck.CheckpointManager(tmp_path / "ckpt").restore(ck.abstract_target(state), fallback=False)
  # The rejected step was moved aside: step 1 is now the newest.
  out = ck.CheckpointManager(tmp_path / "ckpt").restore(ck.abstract_target(state))
  assert out.step == 1 and out.skipped == ()


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from x2vlm_jax import checkpoint as ck

    mgr = ck.CheckpointManager(sys.argv[1], async_save=True)
    mgr.save(1, {"x": jnp.arange(10.0)}, data_iter={"image": {"i": 1}})
    mgr.wait_until_finished()

    async def crash(self):  # the process dies after writing step 2, before committing it
      os._exit(17)
    atomicity.AtomicRenameTemporaryPath.finalize = crash
    mgr.save(2, {"x": jnp.arange(10.0) + 1}, data_iter={"image": {"i": 2}})
    mgr.wait_until_finished()
    os._exit(0)
""")


def test_interrupted_save_is_never_restored(tmp_path):
  ckpt = str(tmp_path / "ckpt")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO)
  proc = subprocess.run(
    [sys.executable, "-c", _CRASH_SCRIPT, ckpt],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 17, proc.stderr[-2000:]
  leftovers = [p for p in os.listdir(ckpt) if p.startswith("2.") and "tmp" in p]
  assert leftovers, os.listdir(ckpt)  # the uncommitted write is on disk ...
  mgr = ck.CheckpointManager(ckpt)
  assert mgr.all_steps() == [1]  # ... but is not a step
  out = mgr.restore({"x": jax.ShapeDtypeStruct((10,), jnp.float32)})
  assert out.step == 1 and out.data_iter == {"image": {"i": 1}}
  np.testing.assert_array_equal(out.state["x"], np.arange(10.0))
  assert not [p for p in os.listdir(ckpt) if "tmp" in p]  # cleaned up at start-up
  mgr.save(2, {"x": jnp.arange(10.0) + 5}, force=True)  # the step can be written again
  mgr.wait_until_finished()
  assert mgr.all_steps() == [1, 2]


def test_restore_onto_other_meshes(tmp_path, mesh8):
  state = _state(mesh8)
  mgr = ck.CheckpointManager(tmp_path / "ckpt")
  mgr.save(3, state, data_iter={"image": {"i": 0}})
  mgr.wait_until_finished()

  mesh42 = make_mesh({"fsdp": 4, "tensor": 2})
  shardings = jax.tree.map(lambda x: NamedSharding(mesh42, P()), state)
  shardings["params"]["w"] = NamedSharding(mesh42, P("fsdp", None))
  shardings["opt"]["mu"] = NamedSharding(mesh42, P("fsdp", None))
  shardings["params"]["emb"] = NamedSharding(mesh42, P(None, None))
  out = mgr.restore(ck.abstract_target(state, shardings))
  _assert_tree_equal(out.state, state)
  assert out.state["params"]["w"].sharding == shardings["params"]["w"]
  assert len(out.state["params"]["w"].addressable_shards) == 8

  one = SingleDeviceSharding(jax.devices()[0])
  out1 = mgr.restore(ck.abstract_target(state, one))
  _assert_tree_equal(out1.state, state)
  assert out1.state["params"]["w"].sharding == one
  mgr.close()


def test_config_change_refused(tmp_path):
  saved = {
    "model": {"variant": "base", "vision": {"depth": 12}},
    "seed": 1,
    "batch_size": 64,
    "lr": 1e-4,
    "data": {"sources": ["coco"], "workers": 4},
  }
  new = {
    "model": {"variant": "base", "vision": {"depth": 24}},
    "seed": 2,
    "batch_size": 64,
    "lr": 3e-4,
    "data": {"sources": ["coco", "vg"], "workers": 8},
  }
  with pytest.raises(ck.ConfigChangedError) as err:
    ck.check_config_compatible(saved, new, ("model", "seed", "batch_size", "data.sources"))
  msg = str(err.value)
  assert "model.vision.depth: 12 -> 24" in msg
  assert "seed: 1 -> 2" in msg
  assert 'data.sources: ["coco"] -> ["coco", "vg"]' in msg
  assert "lr" not in msg and "workers" not in msg and "batch_size" not in msg
  assert "allow_config_change=True" in msg
  diffs = ck.check_config_compatible(saved, new, ("model", "seed"), allow_config_change=True)
  assert diffs == ["model.vision.depth: 12 -> 24", "seed: 1 -> 2"]
  assert ck.check_config_compatible(saved, dict(saved, lr=1.0), ("model", "seed")) == []
  # A key present on one side only is a difference too.
  with pytest.raises(ck.ConfigChangedError, match=r"model.text_depth: <absent> -> 6"):
    ck.check_config_compatible(
      saved, {**saved, "model": {**saved["model"], "text_depth": 6}}, ("model",)
    )

  mgr = ck.CheckpointManager(tmp_path / "ckpt", async_save=False)
  mgr.save(1, {"x": np.zeros(3, np.float32)}, config=saved)
  with pytest.raises(ck.ConfigChangedError, match="seed: 1 -> 2"):
    mgr.restore(check_config=ckpt_config.ConfigCheck(new, ("seed",)))
  allowed = ckpt_config.ConfigCheck(new, ("seed",), allow_config_change=True)
  out = mgr.restore(check_config=allowed)
  assert out.step == 1 and out.warnings == ("critical setting changed (allowed): seed: 1 -> 2",)


def test_bad_inputs_named(tmp_path):
  mgr = ck.CheckpointManager(tmp_path / "ckpt", async_save=False)
  with pytest.raises(TypeError, match=r"'rng'.*key_data"):
    mgr.save(1, {"rng": jax.random.key(0)})
  with pytest.raises(TypeError, match=r"'video' is not JSON"):
    mgr.save(1, {"x": np.zeros(2)}, data_iter={"video": {"buf": b"\x00"}})
  with pytest.raises(ck.CheckpointError, match="no committed checkpoint"):
    mgr.restore()
  with pytest.raises(ck.CheckpointError, match="step 5 is not a committed"):
    mgr.restore(step=5)


def test_checksums_are_sharding_independent(mesh8):
  x = np.random.RandomState(3).randn(16, 6).astype(np.float32)
  host = checksums.leaf_checksums({"x": x})["x"]
  on8 = checksums.leaf_checksums({"x": jax.device_put(x, NamedSharding(mesh8, P("data")))})["x"]
  mesh42 = make_mesh({"fsdp": 4, "tensor": 2})
  on42 = checksums.leaf_checksums(
    {"x": jax.device_put(x, NamedSharding(mesh42, P("fsdp", "tensor")))}
  )["x"]
  assert host == on8 == on42
  y = x.copy()
  y[5, 2] = np.nextafter(y[5, 2], np.inf)  # one ulp in one element
  assert checksums.leaf_checksums({"x": y})["x"]["fingerprint"] != host["fingerprint"]
  z = x.copy()
  z[[0, 1]] = z[[1, 0]]  # same values, swapped positions
  assert checksums.leaf_checksums({"x": z})["x"]["fingerprint"] != host["fingerprint"]
  assert checksums.verify_checksums({"x": y}, {"x": host})[0].startswith("leaf 'x': fingerprint")


def test_restore_with_dtype_cast_is_not_corrupt(tmp_path):
  state = {"w": jnp.linspace(0.0, 1.0, 12, dtype=jnp.float32), "n": jnp.int32(4)}
  mgr = ck.CheckpointManager(tmp_path / "ckpt", async_save=False)
  mgr.save(1, state)
  target = {
    "w": jax.ShapeDtypeStruct((12,), jnp.bfloat16),
    "n": jax.ShapeDtypeStruct((), jnp.int32),
  }
  out = mgr.restore(target)
  assert out.step == 1 and out.state["w"].dtype == jnp.bfloat16 and out.skipped == ()
  np.testing.assert_allclose(
    np.asarray(out.state["w"], np.float32), np.asarray(state["w"]), atol=4e-3
  )


def test_nnx_model_and_optimizer_state(tmp_path):
  import optax
  from flax import nnx

  def build(seed):
    model = nnx.Linear(3, 5, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

  state = nnx.state(build(0))
  mgr = ck.CheckpointManager(tmp_path / "ckpt", async_save=False)
  mgr.save(1, state)
  target = nnx.state(nnx.eval_shape(lambda: build(1)))
  out = mgr.restore(ck.abstract_target(target, SingleDeviceSharding(jax.devices()[0])))
  _assert_tree_equal(out.state, state)
  model, _ = build(2)
  nnx.update(model, out.state[0])
  np.testing.assert_array_equal(model.kernel[...], state[0]["kernel"][...])


def test_partial_restore_reads_and_verifies_only_the_subtree(tmp_path, mesh8):
  """`partial=True`: only the target's leaves are read and checked (the parameters-only restore
  of evaluation); a corrupt leaf among them still makes the step fall back."""
  mgr = ck.CheckpointManager(tmp_path / "ckpt", async_save=False)
  s1, s2 = _state(mesh8, seed=1), _state(mesh8, seed=2)
  mgr.save(1, s1, data_iter={"image": {"i": 1}}, config={"a": 1})
  mgr.save(2, s2, data_iter={"image": {"i": 2}}, config={"a": 2})
  target = {"params": ck.abstract_target(s2["params"])}
  out = mgr.restore(target, partial=True)
  assert out.step == 2 and set(out.state) == {"params"} and out.config == {"a": 2}
  _assert_tree_equal(out.state, {"params": s2["params"]})
  assert out.state["params"]["w"].sharding == s2["params"]["w"].sharding
  needle = np.asarray(s2["params"]["w"])[0, :8].tobytes()
  _flip_byte_in_array_data(str(tmp_path / "ckpt" / "2"), needle)
  out = ck.CheckpointManager(tmp_path / "ckpt", async_save=False).restore(target, partial=True)
  assert out.step == 1 and "file state/ocdbt.process_0/d/" in out.skipped[0], out.skipped
  _assert_tree_equal(out.state, {"params": s1["params"]})
