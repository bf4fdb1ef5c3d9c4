"""The manifest of a checkpoint step: the size and SHA-256 of every file, written last before
orbax's commit marker, checked before anything of the step is read.

Orbax commits a step in `TemporaryPath.finalize` (on the primary process, after every process has
written its files): it stamps the commit time into `_CHECKPOINT_METADATA`, writes the step's
`commit_success.txt` and renames `<step>.orbax-checkpoint-tmp-*` to `<step>` (or, on GCS, only
writes the marker). `ManifestRenamePath` / `ManifestCommitFilePath` do the same with one step in
between: after the metadata stamp, every file under the step (arrays, OCDBT manifests,
`_sharding`, `_METADATA`, the data-iterator state of every process, the config, the per-leaf
checksums, the items' own `commit_success.txt`, `_CHECKPOINT_METADATA`) is hashed into
`x2vlm_manifest.json`; only then is the marker written. So a committed step always carries a
manifest that covers everything it holds but the marker, and the marker is checked by presence.

`check_step` is what a restore runs first: a missing marker or manifest, or any listed file that
is missing, of another size or of another digest rejects the step, naming the file. Files that
are not in the manifest are reported as notes, not rejected: a restore reads only files the
verified ones reference. With several processes each hashes its share of the files and the
verdicts are gathered, so every process takes the same decision
(docs/training.md#checkpoint-integrity).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import time

import jax
import numpy as np
from etils import epath
from orbax.checkpoint import path as ocp_path
from orbax.checkpoint._src.metadata import checkpoint as ocp_metadata

MANIFEST = "x2vlm_manifest.json"
MARKER = ocp_path.atomicity_types.COMMIT_SUCCESS_FILE  # 'commit_success.txt'
_FORMAT = 1
_CHUNK = 8 << 20
# Per-file verdicts (gathered across processes as integers).
_OK, _MISSING, _SIZE, _DIGEST, _UNREADABLE = range(5)
_WHY = {
  _MISSING: "is missing",
  _SIZE: "has another size than the manifest records",
  _DIGEST: "differs from its SHA-256 in the manifest",
  _UNREADABLE: "cannot be read",
}


def _files(root: epath.Path) -> list[str]:
  """Every file under `root`, as sorted '/'-separated paths relative to it."""
  out, todo = [], [root]
  while todo:
    d = todo.pop()
    for p in d.iterdir():
      if p.is_dir():
        todo.append(p)
      else:
        out.append(str(p.relative_to(root)).replace(os.sep, "/"))
  return sorted(out)


def _digest(path: epath.Path) -> tuple[int, str]:
  """(size, SHA-256 hex) of one file."""
  h, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      size += len(chunk)
  return size, h.hexdigest()


def _map(fn, items: list):
  """fn over items on a few threads (hashlib releases the GIL on large buffers)."""
  if len(items) < 2:
    return [fn(x) for x in items]
  workers = min(8, os.cpu_count() or 1, len(items))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(fn, items))


def _canonical(obj) -> str:
  return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def marker_text(final_dir) -> str:
  """What orbax writes into a step's commit marker (its finalize, for both commit kinds)."""
  return f"Checkpoint commit was successful to {final_dir}"


def build(step_dir, marker: str) -> dict:
  """The manifest of every file under `step_dir` (except the manifest and the marker, whose
  future content `marker` it records), sealed by the SHA-256 of its own canonical JSON."""
  root = epath.Path(step_dir)
  names = [n for n in _files(root) if n not in (MANIFEST, MARKER)]
  digests = _map(lambda n: _digest(root / n), names)
  body = {
    "format": _FORMAT,
    "algorithm": "sha256",
    "marker": marker,
    "files": {n: {"size": s, "sha256": d} for n, (s, d) in zip(names, digests)},
  }
  return dict(body, seal=hashlib.sha256(_canonical(body).encode()).hexdigest())


def write(step_dir, marker: str) -> dict:
  """Writes the manifest of `step_dir` into it (canonical JSON: every byte matters); returns it."""
  manifest = build(step_dir, marker)
  (epath.Path(step_dir) / MANIFEST).write_text(_canonical(manifest))
  return manifest


@dataclasses.dataclass(frozen=True)
class Verdict:
  """What `check_step` found: `problems` reject the step; `notes` (unlisted files) do not."""

  problems: tuple[str, ...]
  notes: tuple[str, ...] = ()

  @property
  def ok(self) -> bool:
    return not self.problems


def _read_manifest(root: epath.Path) -> tuple[dict | None, str | None]:
  """(manifest, None) or (None, why the step is rejected): marker present, manifest intact."""
  if not (root / MARKER).exists():
    return None, f"file {MARKER} is missing (the commit marker)"
  if not (root / MANIFEST).exists():
    return None, f"file {MANIFEST} is missing (written by an older version, or removed)"
  try:
    raw = (root / MANIFEST).read_bytes().decode()
    manifest = json.loads(raw)
    body = {k: v for k, v in manifest.items() if k != "seal"}
    if _canonical(manifest) != raw:
      raise ValueError("not in canonical form")
    if manifest.get("seal") != hashlib.sha256(_canonical(body).encode()).hexdigest():
      raise ValueError("its seal does not match its content")
    if manifest["format"] != _FORMAT:
      raise ValueError(f"format {manifest['format']!r}")
    files = manifest["files"]
    sizes = {n: int(e["size"]) for n, e in files.items()}
    digests = {n: str(e["sha256"]) for n, e in files.items()}
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    return None, f"file {MANIFEST} is damaged ({type(e).__name__}: {str(e)[:200]})"
  if (root / MARKER).read_bytes() != str(manifest.get("marker")).encode():
    return None, f"file {MARKER} differs from the content the manifest records"
  return {"sizes": sizes, "digests": digests}, None


def _verdict(root: epath.Path, name: str, size: int, digest: str) -> int:
  path = root / name
  try:
    if not path.exists():
      return _MISSING
    if path.stat().length != size:
      return _SIZE
    return _OK if _digest(path)[1] == digest else _DIGEST
  except OSError:
    return _UNREADABLE


def _gather_max(codes: np.ndarray) -> np.ndarray:
  """Element-wise max of every process's verdicts (each process filled only its share)."""
  if jax.process_count() == 1:
    return codes
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  every = np.asarray(multihost_utils.process_allgather(codes))
  return every.reshape(jax.process_count(), -1).max(axis=0)


def check_step(step_dir, prefixes: tuple[str, ...] | None = None, share: bool = True) -> Verdict:
  """Checks the marker, the manifest and every file it lists (or those under `prefixes`).

  Args:
    step_dir: the committed step directory.
    prefixes: check only files whose path starts with one of these (e.g. ('config/',) to read
      the config alone); None = every file.
    share: with several processes, hash only this process's share and gather the verdicts
      (a collective: every process must call it). False: this process checks every file.
  """
  root = epath.Path(step_dir)
  manifest, why = _read_manifest(root)
  if why is not None:
    return Verdict((why,))
  names = sorted(manifest["sizes"])
  if prefixes is not None:
    names = [n for n in names if n.startswith(tuple(prefixes))]
  rank, count = (jax.process_index(), jax.process_count()) if share else (0, 1)
  mine = names[rank::count]
  codes = np.zeros(len(names), np.int32)
  results = _map(lambda n: _verdict(root, n, manifest["sizes"][n], manifest["digests"][n]), mine)
  codes[rank::count] = results
  if share:
    codes = _gather_max(codes)
  problems = tuple(f"file {n} {_WHY[int(c)]}" for n, c in zip(names, codes) if c != _OK)
  notes = ()
  if prefixes is None:
    extra = sorted(set(_files(root)) - set(names) - {MANIFEST, MARKER})
    notes = tuple(f"file {n} is not in the manifest (ignored)" for n in extra)
  return Verdict(problems, notes)


# ----------------------------------------------------------------------------------------------
# Orbax's commit with the manifest written just before the marker.


class _ManifestBeforeCommit:
  """Mixin for orbax's TemporaryPath classes: the step-level finalize writes the manifest.

  Orbax uses one TemporaryPath class for the step and for each item inside it; only the step's
  instance gets the checkpoint-metadata store (orbax's `Checkpointer.get_temporary_path`), which
  is how the step is told apart here."""

  async def finalize(self):
    store = self._checkpoint_metadata_store
    if store is None:  # an item directory: orbax's own finalize
      return await super().finalize()
    # orbax's finalize starts by stamping the commit time into _CHECKPOINT_METADATA; do it first
    # so the manifest covers the final bytes, then let orbax write the marker (and rename).
    stamp = ocp_metadata.step_metadata_file_path(self.get())
    await asyncio.to_thread(store.wait_until_finished)
    await asyncio.to_thread(store.update, file_path=stamp, commit_timestamp_nsecs=time.time_ns())
    await asyncio.to_thread(store.wait_until_finished)
    await asyncio.to_thread(write, self.get(), marker_text(self.get_final()))
    self._checkpoint_metadata_store = None  # stamped above; a second stamp would change a file
    try:
      await super().finalize()
    finally:
      self._checkpoint_metadata_store = store


class ManifestRenamePath(_ManifestBeforeCommit, ocp_path.atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic-rename commit (local and network file systems) with the manifest."""


class ManifestCommitFilePath(_ManifestBeforeCommit, ocp_path.atomicity.CommitFileTemporaryPath):
  """Orbax's commit-file commit (GCS: no rename) with the manifest."""


def temporary_path_class(directory) -> type:
  """The TemporaryPath class for a checkpoint directory, as orbax would choose it."""
  if str(directory).startswith("gs://"):
    return ManifestCommitFilePath
  return ManifestRenamePath
