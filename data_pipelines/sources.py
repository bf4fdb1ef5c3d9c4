"""Random-access data sources over official JSON files (grain `RandomAccessDataSource`).

A source is a file or a directory of files (names containing `_SUCCESS` are skipped, as the
official reader does). JSON-lines files (pre-training) get a line-offset index, built by a cheap
newline scan and cached (in memory, and on disk when `index_cache_dir` is given), so
`source[i]` seeks straight to line i. JSON-array files (the fine-tuning files: one array of
entries) are read once and kept in memory as compact per-entry JSON. `__getitem__` returns a
canonical record (`features.py`) or raises `SkipRecord`; record ids are
"<file basename>:<line number or 1-based entry index>" unless the entry has an "id".
`open_source` dispatches between JSON lines, JSON arrays and the ArrayRecord reader.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from typing import Sequence

import numpy as np

from data_pipelines import features as F
from data_pipelines import fileio
from data_pipelines.jsonl_format import (
  JsonlFormat,
  array_format,
  default_format,
  parse_line,
  parse_object,
)

_CHUNK = 1 << 24  # bytes read per step of the newline scan
_INDEX_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_ARRAY_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def list_files(path: str | os.PathLike) -> list[str]:
  """The data files of a source: the file itself, or the sorted regular files of a directory.

  Skips names containing `_SUCCESS` (official rule) and hidden files (`.crc`, editor droppings).
  """
  path = os.fspath(path)
  if fileio.is_file(path):
    return [path]
  if not fileio.is_dir(path):
    raise FileNotFoundError(f"data source {path!r} does not exist")
  files = [
    fileio.join(path, n)
    for n in fileio.listdir(path)
    if "_SUCCESS" not in n and not n.startswith(".") and fileio.is_file(fileio.join(path, n))
  ]
  if not files:
    raise FileNotFoundError(f"data source {path!r} holds no data files")
  return files


def _scan_lines(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(start offsets, 1-based line numbers) of the non-blank lines of a file; int64 [N] each."""
  starts, ends, base, last_byte = [np.zeros(1, np.int64)], [], 0, b"\n"
  with fileio.open_binary(path) as f:
    while chunk := f.read(_CHUNK):
      nl = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.int64) + base
      ends.append(nl)
      starts.append(nl + 1)
      base += len(chunk)
      last_byte = chunk[-1:]
  if last_byte != b"\n":  # a last line without a newline
    ends.append(np.array([base], np.int64))
  if not ends:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  ends = np.concatenate(ends)
  starts = np.concatenate(starts)[: len(ends)]
  numbers = np.arange(1, len(ends) + 1, dtype=np.int64)
  # Blank lines (empty, or a lone '\r') are not records: the trailing newline of a file must
  # not create one, and the official reader would only drop them as broken lines anyway.
  keep = (ends - starts) > 1
  keep |= (ends - starts == 1) & (_first_bytes(path, starts, ends) != ord("\r"))
  return starts[keep], numbers[keep]


def _first_bytes(path: str, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
  """The first byte of each one-byte line (only those are read)."""
  out = np.zeros(len(starts), np.int64)
  idx = np.flatnonzero(ends - starts == 1)
  if len(idx):
    with fileio.open_binary(path) as f:
      for i in idx:
        f.seek(int(starts[i]))
        out[i] = f.read(1)[0]
  return out


def line_index(path: str, cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Cached (offsets, line numbers) of a file; the cache key includes size and mtime."""
  key = fileio.stat_key(path)
  if key in _INDEX_CACHE:
    return _INDEX_CACHE[key]
  cache_file = None
  if cache_dir:
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:20]
    cache_file = os.path.join(cache_dir, f"{os.path.basename(path)}.{digest}.lineidx.npy")
    if os.path.exists(cache_file):
      both = np.load(cache_file)
      _INDEX_CACHE[key] = (both[0], both[1])
      return _INDEX_CACHE[key]
  index = _scan_lines(path)
  if cache_file:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache_file}.{os.getpid()}.tmp.npy"
    np.save(tmp, np.stack(index))
    os.replace(tmp, cache_file)
  _INDEX_CACHE[key] = index
  return index


class JsonLinesSource:
  """grain `RandomAccessDataSource` over official JSON-lines files of one kind.

  Args:
    path: a file or a directory of files.
    kind: one of `features.KINDS`.
    fmt: key names / image storage (`jsonl_format.default_format(kind)` when None).
    index_cache_dir: optional directory for on-disk line indices.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    kind: str,
    fmt: JsonlFormat | None = None,
    index_cache_dir: str | None = None,
  ):
    if kind not in F.KINDS:
      raise ValueError(f"unknown kind {kind!r}; expected one of {F.KINDS}")
    self.kind, self.fmt = kind, fmt or default_format(kind)
    self.files = list_files(path)
    self._offsets, self._lines = [], []
    for f in self.files:
      offsets, numbers = line_index(f, index_cache_dir)
      self._offsets.append(offsets)
      self._lines.append(numbers)
    self._cum = np.cumsum([0] + [len(o) for o in self._offsets]).tolist()  # [n_files + 1]

  def __len__(self) -> int:
    return self._cum[-1]

  def __repr__(self) -> str:
    return f"JsonLinesSource(kind={self.kind!r}, files={len(self.files)}, records={len(self)})"

  def _locate(self, i: int) -> tuple[int, int]:
    if not -len(self) <= i < len(self):
      raise IndexError(f"record {i} out of range for {len(self)} records")
    i %= len(self)
    fi = bisect.bisect_right(self._cum, i) - 1
    return fi, i - self._cum[fi]

  def location(self, i: int) -> tuple[str, int]:
    """(file path, 1-based line number) of record i."""
    fi, j = self._locate(i)
    return self.files[fi], int(self._lines[fi][j])

  def raw_line(self, i: int) -> bytes:
    """The bytes of line i (without the newline)."""
    fi, j = self._locate(i)
    offsets = self._offsets[fi]
    start = int(offsets[j])
    with fileio.open_binary(self.files[fi]) as f:
      f.seek(start)
      if j + 1 < len(offsets):
        data = f.read(int(offsets[j + 1]) - start)
      else:
        data = f.read()
    return data.split(b"\n", 1)[0].rstrip(b"\r")

  def __getitem__(self, i: int) -> dict:
    """Canonical record i; raises `SkipRecord` for a bad line (never anything else)."""
    path, line = self.location(i)
    rid = f"{os.path.basename(path)}:{line}"
    return parse_line(self.kind, self.raw_line(i), rid, self.fmt, os.path.dirname(path))

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    """Batch read; raises `SkipRecord` at the first bad record."""
    return [self[i] for i in indices]


def is_json_array(path: str | os.PathLike) -> bool:
  """Whether the (first) data file of `path` is a JSON array: its first non-blank byte is '['."""
  with fileio.open_binary(list_files(path)[0]) as f:
    while chunk := f.read(4096):
      head = chunk.lstrip()
      if head:
        return head[:1] == b"["
  return False


def array_entries(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 buffer of every entry re-serialised as JSON, int64 [N + 1] offsets) of a JSON-array
  file; cached in memory per (path, size, mtime). A file that is not one JSON array raises
  ValueError (no entry can be read from it)."""
  st = os.stat(path)
  key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
  if key not in _ARRAY_CACHE:
    try:
      with open(path, "rb") as f:
        entries = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not a JSON file: {e}") from None
    if not isinstance(entries, list):
      raise ValueError(f"{path}: holds a JSON {type(entries).__name__}, not an array of entries")
    parts = [json.dumps(e, ensure_ascii=False).encode("utf-8") for e in entries]
    offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
    _ARRAY_CACHE[key] = (np.frombuffer(b"".join(parts), np.uint8), offsets)
  return _ARRAY_CACHE[key]


class JsonArraySource:
  """grain `RandomAccessDataSource` over JSON-array files (official fine-tuning files).

  Every entry of the array(s) is one record, parsed like a JSON line (`parse_object`); record ids
  are "<file basename>:<1-based entry index>". The default key names are the official
  retrieval ones (`jsonl_format.array_format`: image paths under image_root, `caption`,
  `image_id`; video entries name a JSON file of base64 frames).

  Args:
    path: a JSON-array file or a directory of them.
    kind: one of `features.KINDS`.
    fmt: key names / image storage (`jsonl_format.array_format(kind)` when None).
  """

  def __init__(self, path: str | os.PathLike, kind: str, fmt: JsonlFormat | None = None):
    if kind not in F.KINDS:
      raise ValueError(f"unknown kind {kind!r}; expected one of {F.KINDS}")
    self.kind, self.fmt = kind, fmt or array_format(kind)
    self.files = list_files(path)
    self._entries = [array_entries(f) for f in self.files]
    self._cum = np.cumsum([0] + [len(o) - 1 for _, o in self._entries]).tolist()

  def __len__(self) -> int:
    return self._cum[-1]

  def __repr__(self) -> str:
    return f"JsonArraySource(kind={self.kind!r}, files={len(self.files)}, records={len(self)})"

  def _locate(self, i: int) -> tuple[int, int]:
    if not -len(self) <= i < len(self):
      raise IndexError(f"record {i} out of range for {len(self)} records")
    i %= len(self)
    fi = bisect.bisect_right(self._cum, i) - 1
    return fi, i - self._cum[fi]

  def location(self, i: int) -> tuple[str, int]:
    """(file path, 1-based entry index) of record i."""
    fi, j = self._locate(i)
    return self.files[fi], j + 1

  def raw_entry(self, i: int) -> bytes:
    """Entry i as JSON text."""
    fi, j = self._locate(i)
    buf, offsets = self._entries[fi]
    return buf[offsets[j] : offsets[j + 1]].tobytes()

  def __getitem__(self, i: int) -> dict:
    """Canonical record i; raises `SkipRecord` for a bad entry (never anything else)."""
    path, index = self.location(i)
    rid = f"{os.path.basename(path)}:{index}"
    obj = json.loads(self.raw_entry(i))
    return parse_object(self.kind, obj, rid, self.fmt, os.path.dirname(path))

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    """Batch read; raises `SkipRecord` at the first bad record."""
    return [self[i] for i in indices]


def is_arrayrecord(path: str | os.PathLike) -> bool:
  """Whether `path` is (or holds) a TFDS ArrayRecord dataset written by `arrayrecord.py`."""
  from data_pipelines import arrayrecord  # tfds import is slow; only pay for it when needed

  return arrayrecord.find_dataset_dir(path) is not None


def open_source(
  path: str | os.PathLike, kind: str | None = None, fmt: JsonlFormat | None = None, **kwargs
):
  """A random-access source for `path`: ArrayRecord dataset dir, JSON-array or JSON-lines
  file/dir.

  `kind` is required for JSON unless it can be inferred from the first parseable entries
  (see `detect_kind`); ArrayRecord datasets record their kind.
  """
  from data_pipelines import arrayrecord

  if arrayrecord.find_dataset_dir(path) is not None:
    src = arrayrecord.ArrayRecordSource(path, **kwargs)
    if kind is not None and kind != src.kind:
      raise ValueError(f"{path}: holds {src.kind!r} records, not {kind!r}")
    return src
  if is_json_array(path):
    return JsonArraySource(path, kind or detect_kind(path), fmt)
  return JsonLinesSource(path, kind or detect_kind(path), fmt, **kwargs)


def _kind_of(obj: dict, array: bool) -> str:
  """The kind an official object looks like: elems -> region; video_frames (or, in a JSON
  array, a value naming a JSON frames file) -> video; else image."""
  if "elems" in obj:
    return F.REGION
  if "video_frames" in obj:
    return F.VIDEO
  if array and any(isinstance(v, str) and v.lower().endswith(".json") for v in obj.values()):
    return F.VIDEO
  return F.IMAGE


def detect_kind(path: str | os.PathLike, max_lines: int = 100) -> str:
  """Infers the kind of a JSON source from the keys of its first parseable line(s) / entries."""
  if is_json_array(path):
    buf, offsets = array_entries(list_files(path)[0])
    for j in range(min(max_lines, len(offsets) - 1)):
      obj = json.loads(buf[offsets[j] : offsets[j + 1]].tobytes())
      if isinstance(obj, dict):
        return _kind_of(obj, array=True)
  for f in list_files(path):
    with open(f, "rb") as fh:
      for n, line in enumerate(fh):
        if n >= max_lines:
          break
        try:
          obj = json.loads(line)
        except ValueError:
          continue
        if isinstance(obj, dict):
          return _kind_of(obj, array=False)
  raise ValueError(
    f"{path}: cannot infer the kind (no JSON object in the first lines); pass --kind"
  )
