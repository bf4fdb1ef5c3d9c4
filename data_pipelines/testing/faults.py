"""Fault injector: a copy of a clean JSON-lines set where some lines carry known faults.

Every injected fault maps to exactly one skip reason of `features.SKIP_REASONS`, so a
validator run over the copy must report exactly the returned (record id, reason) list. Used to
test the readers, `checks.check_record` and `python -m data_pipelines.tools.validate`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from typing import NamedTuple

import numpy as np

from data_pipelines import features as F
from data_pipelines.jsonl_format import JsonlFormat, default_format
from data_pipelines.sources import line_index, list_files

# A caption that survives `pre_caption` (no punctuation, not whitespace) but that the BERT
# tokenizer drops entirely: zero-width spaces are format characters (Unicode Cf) it cleans away.
NO_TOKEN_CAPTION = "\u200b\u200b"


class Fault(NamedTuple):
  """One injected fault: the record id a reader reports, the reason, and where the line is."""

  record_id: str
  reason: str
  file: str
  line: int


def applicable_reasons(kind: str, rpath: bool = False) -> tuple[str, ...]:
  """The skip reasons a fault of `kind` can be injected for (missing_image needs path images)."""
  common = ["bad_json", "bad_field_type", "corrupt_image"] + (["missing_image"] if rpath else [])
  common += ["empty_caption", "caption_no_tokens"]
  extra = {F.IMAGE: [], F.REGION: ["bad_box", "no_usable_elem"], F.VIDEO: ["empty_video"]}[kind]
  return tuple(r for r in F.SKIP_REASONS if r in common + extra)


class _Injector:
  """Applies one fault to a parsed line (a dict), writing broken image files when needed."""

  def __init__(self, kind: str, fmt: JsonlFormat, src_dir: str, dst_dir: str):
    self.kind, self.fmt, self.src_dir, self.dst_dir = kind, fmt, src_dir, dst_dir
    self.count = 0

  def _image_slot(self, obj: dict) -> tuple[dict | list, str | int]:
    """(container, key) of the image (or the first video frame) of a line."""
    if self.kind != F.VIDEO:
      return obj, self.fmt.image_key
    frames = obj[self.fmt.image_key]
    return (frames[0], 0) if isinstance(frames[0], list) else (frames, 0)

  def _read_image(self, value: str) -> bytes:
    if self.fmt.is_image_rpath:
      with open(os.path.join(self.fmt.image_root or self.src_dir, value), "rb") as f:
        return f.read()
    return base64.b64decode(value)

  def _all_frames(self, obj: dict) -> list[tuple[list, int]]:
    frames = obj[self.fmt.image_key]
    clips = frames if isinstance(frames[0], list) else [frames]
    return [(clip, i) for clip in clips for i in range(len(clip))]

  def corrupt_image(self, obj: dict) -> None:
    # A video gets every frame corrupted: the pipeline decodes only the frames it samples, so a
    # single bad frame is reported by the validator but may never be read in training.
    slots = self._all_frames(obj) if self.kind == F.VIDEO else [self._image_slot(obj)]
    self.count += 1
    for box, key in slots:
      self._corrupt_one(box, key)

  def _corrupt_one(self, box, key) -> None:
    if self.fmt.is_image_rpath:
      data = self._read_image(box[key])
      rel = os.path.join("images", f"corrupt-{self.count}-{key}.bin")
      os.makedirs(os.path.join(self.dst_dir, "images"), exist_ok=True)
      with open(os.path.join(self.dst_dir, rel), "wb") as f:
        f.write(data[: len(data) * 3 // 5])  # truncated file
      box[key] = rel
    elif self.count % 2:
      data = self._read_image(box[key])
      box[key] = base64.b64encode(data[: len(data) * 3 // 5]).decode("ascii")  # truncated file
    else:
      box[key] = "this is not base64!"

  def missing_image(self, obj: dict) -> None:
    box, key = self._image_slot(obj)
    box[key] = os.path.join("images", "no-such-file.png")

  def _set_captions(self, obj: dict, text: str) -> None:
    key = self.fmt.caption_key
    if (
      self.kind == F.VIDEO
      and isinstance(obj[key], list)
      and isinstance(obj[self.fmt.image_key][0], list)
    ):
      obj[key] = [text] * len(obj[key])  # per-clip captions must keep their count
    else:
      obj[key] = text

  def apply(self, reason: str, obj: dict) -> dict:
    fmt = self.fmt
    if reason == "bad_field_type":
      if self.kind == F.REGION:
        obj["elems"] = "not a list"
      else:
        obj[fmt.caption_key] = 42
    elif reason == "corrupt_image":
      self.corrupt_image(obj)
    elif reason == "missing_image":
      self.missing_image(obj)
    elif reason == "empty_caption":
      self._set_captions(obj, " \t ")
    elif reason == "caption_no_tokens":
      self._set_captions(obj, NO_TOKEN_CAPTION)
    elif reason == "bad_box":
      for i, e in enumerate(obj["elems"]):
        x, y, w, h = e["bb"]
        # Alternate the two ways of failing the crop rule: non-positive size, outside the image.
        e["bb"] = [x, y, 0, h] if i % 2 == 0 else [-5, y, w, h]
    elif reason == "no_usable_elem":
      for i, e in enumerate(obj["elems"]):
        if i == 0 and len(obj["elems"]) > 1:
          e["bb"] = [e["bb"][0], e["bb"][1], e["bb"][2], -1]  # one bad box, the rest no text
        else:
          e["caption"] = "  "
          e.pop("attributes", None)
    elif reason == "empty_video":
      obj[fmt.image_key] = []
    else:
      raise ValueError(f"cannot inject {reason!r}")
    return obj


def inject_faults(
  src: str | os.PathLike,
  dst: str | os.PathLike,
  kind: str,
  fraction: float = 0.05,
  seed: int = 0,
  fmt: JsonlFormat | None = None,
  reasons: tuple[str, ...] | None = None,
) -> list[Fault]:
  """Copies the clean JSON-lines set `src` (dir) to `dst`, breaking `fraction` of its lines.

  The broken lines are drawn at random (seeded) and cycle through `reasons` (default: all
  `applicable_reasons` of the kind), so with enough lines every reason occurs. Files other than
  data files (`_SUCCESS`, an `images/` folder of path-based sets) are copied as they are.

  Returns:
    the injected faults sorted by (file, line); `record_id` is what the reader reports (the
    line's "id", or "<file>:<line>" for lines that no longer parse as JSON).
  """
  fmt = fmt or default_format(kind)
  src, dst = os.fspath(src), os.fspath(dst)
  reasons = reasons or applicable_reasons(kind, fmt.is_image_rpath)
  if not os.path.isdir(src):
    raise NotADirectoryError(f"{src}: the fault injector copies a directory of JSON-lines files")
  if os.path.exists(dst):
    raise FileExistsError(f"{dst} exists")
  shutil.copytree(src, dst)
  files = list_files(src)
  positions = [(f, int(n)) for f in files for n in line_index(f)[1]]
  n_bad = int(round(fraction * len(positions)))
  rng = np.random.default_rng(seed)
  chosen = sorted(rng.choice(len(positions), size=n_bad, replace=False).tolist())
  order = rng.permutation(n_bad)
  plan = {positions[c]: reasons[int(order[k]) % len(reasons)] for k, c in enumerate(chosen)}
  injector = _Injector(kind, fmt, os.path.dirname(files[0]), dst)
  faults = []
  for f in files:
    out = os.path.join(dst, os.path.relpath(f, src))
    with open(f, "rb") as fh:
      lines = fh.read().split(b"\n")
    for n in range(1, len(lines) + 1):
      reason = plan.get((f, n))
      if reason is None:
        continue
      text = lines[n - 1]
      obj = json.loads(text)
      rid = str(obj["id"]) if "id" in obj else f"{os.path.basename(f)}:{n}"
      if reason == "bad_json":
        lines[n - 1] = text[: len(text) // 2]  # a line cut in half
        rid = f"{os.path.basename(f)}:{n}"
      else:
        lines[n - 1] = json.dumps(injector.apply(reason, obj)).encode()
      faults.append(Fault(rid, reason, out, n))
    with open(out, "wb") as fh:
      fh.write(b"\n".join(lines))
  return sorted(faults, key=lambda x: (x.file, x.line))
