"""File access of the data sources, local or in a bucket (`gs://bucket/...`, `s3://...`).

Local paths keep the builtin calls (the loaders' hot path: one `open` + `seek` per record); cloud
URLs go through `etils.epath` (fsspec: gcsfs / s3fs, or TensorFlow's gfile when installed), the
path type of the whole project (`x2vlm_jax/paths.py`). A URL whose client library is missing
fails at once with the extra that installs it (`pip install 'x2vlm-jax[gcs]'`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import IO

from etils import epath

URL_SCHEMES = ("gs", "s3", "az", "hf")
# scheme -> (client module for fsspec, the extra that installs it)
CLIENTS = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}


class MissingExtraError(ImportError):
  """A cloud URL was given but no client library for it is installed."""


def is_url(path) -> bool:
  """Whether `path` is a cloud URL such as gs://bucket/x."""
  scheme, sep, _ = os.fspath(path).partition("://")
  return bool(sep) and scheme in URL_SCHEMES


def _client_available(scheme: str, module: str) -> bool:
  import fsspec  # pylint: disable=g-import-not-at-top

  if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is not None:
    return True  # epath then reads gs:// through tf.io.gfile
  if scheme in fsspec.registry:  # an implementation registered in this process
    return True
  return importlib.util.find_spec(module) is not None


def url_path(path) -> epath.Path:
  """`path` as an `epath.Path`; a cloud URL keeps its `//` and needs its client library."""
  text = os.fspath(path)
  if is_url(text):
    scheme = text.split("://", 1)[0]
    if scheme in CLIENTS and not _client_available(scheme, CLIENTS[scheme][0]):
      module, extra = CLIENTS[scheme]
      raise MissingExtraError(
        f"{text}: {scheme}:// paths need the {module} client: pip install 'x2vlm-jax[{extra}]'"
      )
  return epath.Path(text)


def open_binary(path) -> IO[bytes]:
  return url_path(path).open("rb") if is_url(path) else open(path, "rb")


def is_file(path) -> bool:
  return url_path(path).is_file() if is_url(path) else os.path.isfile(path)


def is_dir(path) -> bool:
  return url_path(path).is_dir() if is_url(path) else os.path.isdir(path)


def listdir(path) -> list[str]:
  """Sorted names in a directory."""
  if is_url(path):
    return sorted(p.name for p in url_path(path).iterdir())
  return sorted(os.listdir(path))


def join(path, name: str) -> str:
  """`path/name` that keeps a URL's `//` (os.path.join does, posix separators)."""
  return os.path.join(os.fspath(path), name)


def stat_key(path) -> tuple[str, int, int]:
  """(absolute path or URL, size, mtime) of a file: the key of the in-memory index caches."""
  if is_url(path):
    st = url_path(path).stat()
    return os.fspath(path), int(st.length), int(st.mtime)
  st = os.stat(path)
  return os.path.abspath(path), st.st_size, st.st_mtime_ns
