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

import os
import pathlib
import shutil
import tempfile

from etils import epath

from data_pipelines import fileio

# The URL test and the client check live with the data sources' file access (layer 0), so the
# trainer and the data readers give the same error for a missing client.
MissingExtraError = fileio.MissingExtraError
is_remote = fileio.is_url


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as an `epath.Path`; a cloud URL keeps its `//` and needs its client library."""
  return fileio.url_path(p)


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
