"""A stand-in for Google Cloud Storage that works offline: `gs://bucket/key` lives in a local
folder, behind the same layers a real bucket goes through.

  * `etils.epath` (every path this project touches) reaches `gs://` through fsspec's 'gcs'
    protocol (gcsfs when TensorFlow is absent); `FakeGCS` takes that protocol's place;
  * orbax writes arrays with TensorStore, whose 'gcs' driver talks HTTP to the bucket; the
    kvstore spec orbax builds for a `gs://` path is redirected to TensorStore's 'file' driver on
    the same folder.

So the code under test handles `gs://...` strings end to end (no `pathlib` collapsing `//`, no
append-mode writes, which object stores do not offer) while the bytes land in `root`.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import fsspec
from fsspec.implementations.local import LocalFileSystem


def _fake_fs_class(root: str):
  class FakeGCS(LocalFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""

    @classmethod
    def _strip_protocol(cls, path):
      path = os.fspath(path)
      for prefix in ("gs://", "gcs://"):
        if path.startswith(prefix):
          path = path[len(prefix) :]
      if path.startswith(root):
        return path.rstrip("/") or root
      return os.path.join(root, path).rstrip("/")

    def _relative(self, path: str) -> str:
      return os.path.relpath(path, root)

    def glob(self, path, **kwargs):  # gcsfs answers 'bucket/key', epath adds 'gs://'
      return [self._relative(p) for p in super().glob(path, **kwargs)]

    def open(self, path, mode="rb", **kwargs):
      if "a" in mode:  # object stores cannot append: code that does would break on a bucket
        raise OSError(f"append mode on an object store: {path}")
      return super().open(path, mode, **kwargs)

  return FakeGCS


@contextlib.contextmanager
def fake_gcs(root: str, monkeypatch):
  """Within the context, `gs://` paths (epath/fsspec and orbax's TensorStore specs) are `root`."""
  from orbax.checkpoint._src.path import gcs_utils

  root = os.path.abspath(root)
  os.makedirs(root, exist_ok=True)
  cls = _fake_fs_class(root)
  registry = importlib.import_module("fsspec.registry")._registry  # the writable table
  saved = {p: registry.get(p) for p in ("gs", "gcs")}
  for p in ("gs", "gcs"):
    fsspec.register_implementation(p, cls, clobber=True)
  from etils.epath import backend

  backend.fsspec_backend._get_filesystem.cache_clear()

  def file_spec(path: str) -> dict:
    return {"driver": "file", "path": os.path.join(root, path.removeprefix("gs://"))}

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", file_spec)
  # Orbax asks the bucket (google-cloud-storage) whether it has a hierarchical namespace.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  try:
    yield root
  finally:
    backend.fsspec_backend._get_filesystem.cache_clear()
    for p, impl in saved.items():  # the process goes back to the real client (or none)
      if impl is None:
        registry.pop(p, None)
      else:
        registry[p] = impl
