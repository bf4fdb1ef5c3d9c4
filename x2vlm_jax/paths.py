"""One path type for every file a run reads or writes: `etils.epath.Path` (the one orbax uses).

`pathlib.Path("gs://bucket/run")` collapses the `//` into a local folder `gs:/bucket/run`; an
`epath.Path` keeps the URL and reaches the bucket through fsspec (gcsfs, s3fs) or TensorFlow's
gfile when installed. `path()` is the only constructor the trainer, the evaluator and the
exporter use; for a cloud URL it first checks that a client library can serve it and otherwise
names the extra to install (`pip install 'x2vlm-jax[gcs]'`).

Object stores cannot append to a file, and the log files (train.log, metrics.jsonl, TensorBoard
events, example-id logs) grow line by line. `LogDir` gives them a local folder: the workdir
itself when it is local, else a staging folder whose files `sync()` copies to the workdir (at
every checkpoint save and at the end of the run), after `LogDir` has copied the existing logs
down so that a resumed run continues them.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

from etils import epath

# scheme -> (client module for fsspec, the extra that installs it)
_CLIENTS = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}
_URL_SCHEMES = ("gs", "s3", "az", "hf")


class MissingExtraError(ImportError):
  """A cloud URL was given but no client library for it is installed."""


def is_remote(p) -> bool:
  """Whether `p` (str or path) is a cloud URL such as gs://bucket/x."""
  return os.fspath(p).split("://", 1)[0] in _URL_SCHEMES and "://" in os.fspath(p)


def _client_available(scheme: str, module: str) -> bool:
  import fsspec  # pylint: disable=g-import-not-at-top

  if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is not None:
    return True  # epath then reads gs:// through tf.io.gfile
  if scheme in fsspec.registry:  # an implementation registered in this process
    return True
  return importlib.util.find_spec(module) is not None


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as an `epath.Path`; a cloud URL keeps its `//` and needs its client library."""
  text = os.fspath(p)
  if is_remote(text):
    scheme = text.split("://", 1)[0]
    if scheme in _CLIENTS and not _client_available(scheme, _CLIENTS[scheme][0]):
      module, extra = _CLIENTS[scheme]
      raise MissingExtraError(
        f"{text}: {scheme}:// paths need the {module} client: pip install 'x2vlm-jax[{extra}]'"
      )
  return epath.Path(text)


def absolute(p: str | os.PathLike) -> epath.Path:
  """`path(p)` made absolute (orbax wants absolute paths); a cloud URL is one already
  (`epath.Path.absolute` would prefix it with the working directory)."""
  p = path(p)
  return p if is_remote(p) else p.absolute()


class LogDir:
  """The local folder the append-only logs of a run are written to (see the module docstring).

  Args:
    workdir: the run directory (local or a cloud URL).
    names: files of an earlier run to copy down first (they are continued, not restarted).
  """

  def __init__(self, workdir: epath.Path, names: tuple[str, ...] = ()):
    self.workdir = workdir
    self.remote = is_remote(workdir)
    if not self.remote:
      self.local = pathlib.Path(os.fspath(workdir))
      self.local.mkdir(parents=True, exist_ok=True)
      return
    self.local = pathlib.Path(tempfile.mkdtemp(prefix="x2vlm_logs_"))
    for name in names:
      src = workdir / name
      if src.exists():
        (self.local / name).write_bytes(src.read_bytes())

  def sync(self) -> None:
    """Copies every local log file to the workdir (whole files: object stores cannot append)."""
    if not self.remote:
      return
    for f in sorted(self.local.rglob("*")):
      if f.is_file():
        dst = self.workdir / f.relative_to(self.local).as_posix()
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(f.read_bytes())

  def close(self) -> None:
    """Last sync; the staging folder is removed."""
    if self.remote:
      self.sync()
      shutil.rmtree(self.local, ignore_errors=True)
