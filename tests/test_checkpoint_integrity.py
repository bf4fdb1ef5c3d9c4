"""Checkpoints that cannot lie (x2vlm_jax/ckpt_manifest.py, checkpoint.py): every file of a step
is covered by the manifest, a damaged step is rejected naming the file, moved aside and the run
can save that step again; config and shapes are checked before any array is read.

The fault matrix corrupts the files of ONE saved step of a tiny state and restores it again and
again: nothing is compiled inside the loop (asserted)."""

import contextlib
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from x2vlm_jax import checkpoint as ck
from x2vlm_jax import checksums, ckpt_config, ckpt_manifest
from x2vlm_jax.sharding import make_mesh


def _state(mesh, seed):
  """A tiny train-state-like tree: a sharded array, a replicated one, counters, a host leaf."""
  rs = np.random.RandomState(seed)
  return {
    "params": {
      "w": jax.device_put(rs.randn(16, 3).astype(np.float32), NamedSharding(mesh, P("data"))),
      "b": jax.device_put(rs.randn(5).astype(np.float32), NamedSharding(mesh, P())),
    },
    "step": jax.device_put(np.int32(seed), NamedSharding(mesh, P())),
    "host": np.arange(3, dtype=np.int64) + seed,
  }


def _equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def mesh():
  return make_mesh({"data": 8})


@contextlib.contextmanager
def _no_compiles():
  seen = []
  listener = lambda event, duration, **kw: seen.append(event) if "compile" in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _files(step_dir) -> list[str]:
  return sorted(
    os.path.relpath(os.path.join(root, f), step_dir)
    for root, _, files in os.walk(step_dir)
    for f in files
  )


def _saved(tmp_path, mesh):
  """Steps 1 and 2 of a tiny state; returns (directory, state 1, state 2)."""
  s1, s2 = _state(mesh, 1), _state(mesh, 2)
  with ck.CheckpointManager(tmp_path / "ckpt", async_save=False) as m:
    m.save(1, s1, data_iter={"process_0": {"image": {"next": 1}}}, config={"model": 1})
    m.save(2, s2, data_iter={"process_0": {"image": {"next": 2}}}, config={"model": 1})
  return tmp_path / "ckpt", s1, s2


def test_every_file_of_a_step_is_verified(tmp_path, mesh):
  """For each file of a saved step: one flipped byte, then the file deleted. Every time the
  restore rejects step 2 naming the file, moves it aside and restores step 1."""
  d, s1, _ = _saved(tmp_path, mesh)
  pristine = tmp_path / "pristine"
  shutil.copytree(d / "2", pristine)
  files = _files(pristine)
  # Every kind of file the issue found unchecked is among them.
  for want in (
    "data_iter/",
    "config/",
    "state/_sharding",
    "_CHECKPOINT_METADATA",
    "manifest.ocdbt",
  ):
    assert any(want in f for f in files), (want, files)
  assert {ckpt_manifest.MARKER, ckpt_manifest.MANIFEST} <= set(files)
  assert sum(f.endswith(ckpt_manifest.MARKER) for f in files) == 5  # the step's and 4 items'
  target = ck.abstract_target(s1)
  mgr = ck.CheckpointManager(d, async_save=False)
  assert mgr.restore(target).step == 2  # the fingerprint check's jit is compiled here, once
  shutil.rmtree(d / "2")
  cases = [(f, "flip") for f in files] + [(f, "delete") for f in files]
  with _no_compiles() as compiles:
    for name, how in cases:
      shutil.copytree(pristine, d / "2")
      path = d / "2" / name
      if how == "flip":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
      else:
        path.unlink()
      out = mgr.restore(target)
      assert out.step == 1 and out.data_iter == {"process_0": {"image": {"next": 1}}}, name
      assert len(out.skipped) == 1 and f"file {name} " in out.skipped[0], (how, out.skipped)
      assert "step 2 is corrupt" in out.skipped[0] and "moved aside to 2.corrupt-" in out.skipped[0]
      _equal(out.state, s1)
      (moved,) = mgr.moved_aside()
      assert mgr.all_steps() == [1] and (d / moved / ckpt_manifest.MANIFEST).exists() != (
        name == ckpt_manifest.MANIFEST and how == "delete"
      )
      shutil.rmtree(d / moved)
  assert not compiles, compiles
  mgr.close()
  print(f"{len(cases)} corruptions of {len(files)} files, all rejected naming the file")


def test_rejected_step_moved_aside_and_saved_again(tmp_path, mesh):
  d, s1, s2 = _saved(tmp_path, mesh)
  (d / "2" / "data_iter" / "metadata").write_text('{"process_0": {"image": {"next": 3}}}')
  with ck.CheckpointManager(d, async_save=True) as mgr:
    out = mgr.restore(ck.abstract_target(s1))
    assert out.step == 1 and "file data_iter/metadata " in out.skipped[0]
    (moved,) = mgr.moved_aside()
    assert moved.startswith("2.corrupt-") and mgr.all_steps() == [1]
    assert mgr.save(2, s2, data_iter={"process_0": {"image": {"next": 2}}})
    mgr.wait_until_finished()
    assert mgr.all_steps() == [1, 2] and mgr.moved_aside() == [moved]
    out = mgr.restore(ck.abstract_target(s2))
    assert out.step == 2 and out.skipped == ()
    _equal(out.state, s2)
    # An explicitly requested step that is damaged fails loudly (no fallback).
    (d / "2" / ckpt_manifest.MARKER).unlink()
    with pytest.raises(ck.CheckpointError, match="step 2 is corrupt: file commit_success.txt"):
      mgr.restore(ck.abstract_target(s2), step=2)


def test_read_only_and_partial_restores_verify_without_moving(tmp_path, mesh):
  """Evaluators read with read_only=True and a sub-tree (partial=True): the whole manifest is
  still checked; a damaged step is skipped but left where it is."""
  d, s1, _ = _saved(tmp_path, mesh)
  (d / "2" / "state" / "_METADATA").write_text("{}")
  target = {"params": ck.abstract_target(s1["params"])}
  with ck.CheckpointManager(d, read_only=True) as mgr:
    out = mgr.restore(target, partial=True)
    assert out.step == 1 and set(out.state) == {"params"} and out.data_iter == {}
    assert "file state/_METADATA " in out.skipped[0] and "moved" not in out.skipped[0]
    _equal(out.state["params"], s1["params"])
    assert mgr.all_steps() == [1, 2] and mgr.moved_aside() == []
    assert mgr.latest_intact_step() == 1
    assert mgr.saved_config() == {"model": 1}  # step 2's config files are intact: its config
    (d / "2" / "config" / "metadata").write_text('{"model": 2}')
    with pytest.raises(ck.CheckpointError, match="file config/metadata differs"):
      mgr.saved_config(2)


def test_fingerprint_mismatch_with_intact_files_rejected(tmp_path, mesh, monkeypatch):
  """Bits that were wrong when written (files match the manifest) are caught by the per-leaf
  fingerprints after reading: rejected naming the leaf, moved aside."""
  d, s1, s2 = _saved(tmp_path, mesh)
  real = checksums.leaf_checksums

  def lying(tree):
    out = real(tree)
    out["params/b"] = dict(out["params/b"], fingerprint="0" * 16)
    return out

  with monkeypatch.context() as m:
    m.setattr(ck, "leaf_checksums", lying)
    with ck.CheckpointManager(d, async_save=False) as mgr:
      mgr.save(3, s2)
  with ck.CheckpointManager(d) as mgr:
    assert mgr.check_step(3).ok
    out = mgr.restore(ck.abstract_target(s2))
    assert out.step == 2 and "step 3 is corrupt: leaf 'params/b': fingerprint" in out.skipped[0]
    assert [n.split(".")[0] for n in mgr.moved_aside()] == ["3"]


def _refusing_reads(monkeypatch):
  def never(*a, **k):
    raise AssertionError("an array was read")

  monkeypatch.setattr(ck.CheckpointManager, "_read_arrays", never)


def test_config_and_shapes_checked_before_any_array_is_read(tmp_path, mesh, monkeypatch):
  d, s1, _ = _saved(tmp_path, mesh)
  _refusing_reads(monkeypatch)
  check = ckpt_config.ConfigCheck({"model": 2}, ("model",))
  with ck.CheckpointManager(d) as mgr:
    with pytest.raises(ck.ConfigChangedError, match="model: 1 -> 2"):
      mgr.restore(ck.abstract_target(s1), check_config=check)
    wider = dict(s1, params=dict(s1["params"], b=jax.ShapeDtypeStruct((7,), np.float32)))
    with pytest.raises(ck.ConfigChangedError, match=r"'params/b': shape \[5\] in the .*\[7\] here"):
      mgr.restore(ck.abstract_target(wider))
    # Neither is corruption: nothing was moved aside, both steps are still there.
    assert mgr.all_steps() == [1, 2] and mgr.moved_aside() == []


def test_stream_settings_warn_critical_refuse(tmp_path):
  saved = {
    "model": {"variant": "tiny"},
    "_model_resolved": {"text": {"width": 40}},
    "data": {"max_tokens": 16, "mask_prob": 0.5, "num_workers": 0, "image": ["a"]},
  }
  keys = dict(
    critical_keys=("model", "_model_resolved", "data.image"),
    stream_keys=("data",),
    neutral_keys=("data.num_workers",),
  )
  new = {**saved, "data": {**saved["data"], "max_tokens": 30, "mask_prob": 0.3, "num_workers": 4}}
  warnings = ckpt_config.ConfigCheck(new, **keys)(saved)
  assert warnings == [
    "data stream setting changed: data.mask_prob: 0.5 -> 0.3",
    "data stream setting changed: data.max_tokens: 16 -> 30",
  ]
  wider = {**saved, "_model_resolved": {"text": {"width": 384}}}
  with pytest.raises(ck.ConfigChangedError, match="_model_resolved.text.width: 40 -> 384"):
    ckpt_config.ConfigCheck(wider, **keys)(saved)
  # A checkpoint written before `_model_resolved` existed still resumes.
  old = {k: v for k, v in saved.items() if k != "_model_resolved"}
  assert ckpt_config.ConfigCheck(wider, **keys)(old) == []


def test_intact_step_that_cannot_be_read_is_an_error(tmp_path, mesh, monkeypatch):
  """Files matching the manifest but unreadable into the target: not damage, so no fallback
  to an older step and nothing moved aside."""
  d, s1, _ = _saved(tmp_path, mesh)

  def fails(*a, **k):
    raise OSError("disk went away")

  monkeypatch.setattr(ck.CheckpointManager, "_read_arrays", fails)
  with ck.CheckpointManager(d) as mgr:
    with pytest.raises(ck.CheckpointError, match="step 2 is unreadable.*match the manifest"):
      mgr.restore(ck.abstract_target(s1))
    assert mgr.all_steps() == [1, 2] and mgr.moved_aside() == []


def test_commit_file_variant_writes_manifest_before_marker(tmp_path, mesh, monkeypatch):
  """The GCS commit (a marker, no rename) gets the manifest too."""
  monkeypatch.setattr(
    ckpt_manifest, "temporary_path_class", lambda d: ckpt_manifest.ManifestCommitFilePath
  )
  s1 = _state(mesh, 1)
  with ck.CheckpointManager(tmp_path / "ckpt", async_save=True) as mgr:
    mgr.save(4, s1, config={"a": 1})
    mgr.wait_until_finished()
    assert mgr.check_step(4).ok and (tmp_path / "ckpt" / "4" / ckpt_manifest.MANIFEST).exists()
    assert mgr.restore(ck.abstract_target(s1)).step == 4
