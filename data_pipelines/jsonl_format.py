"""The official JSON-lines formats (docs/data.md) <-> canonical records (`features.py`).

`parse_line` turns one text line into a canonical record and never raises anything but
`SkipRecord` (`parse_object` does the same for one entry of a JSON-array file, the fine-tuning
format); `to_line` does the reverse (base64 images), used by the synthetic world and the
tests. Images are not decoded here (that happens in the grain map / `checks.py`); base64 is,
so invalid base64 is reported as 'corrupt_image' at read time.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
from typing import Any

from data_pipelines import features as F
from data_pipelines import fileio


@dataclasses.dataclass(frozen=True)
class JsonlFormat:
  """Key names and image storage of one kind of JSON-lines file.

  `None` keys take the released defaults of the kind (`default_format`). With `is_image_rpath`
  the image field holds a file path instead of base64 bytes; relative paths are resolved
  against `image_root`, or the directory of the JSON-lines file when `image_root` is None.
  `language` picks one entry of a dict caption (the official `language_chosen`); otherwise all
  values of the dict become caption alternatives. `image_id_key` (image and video kinds) names
  an optional key whose value (str or int) becomes the record's 'image_id'. With `frames_file`
  (video kind) the frames key holds the path of a JSON file with the list of base64 frames
  (the official video retrieval format), resolved like an image path.
  """

  image_key: str = "binary"
  caption_key: str = "desc"
  is_image_rpath: bool = False
  image_root: str | None = None
  language: str | None = None
  image_id_key: str | None = None
  frames_file: bool = False


def default_format(kind: str, **overrides) -> JsonlFormat:
  """The released key names per kind (docs/data.md), with optional overrides."""
  keys = {
    F.IMAGE: ("binary", "desc"),
    F.REGION: ("binary", "caption"),
    F.VIDEO: ("video_frames", "text"),
  }[kind]
  return dataclasses.replace(JsonlFormat(image_key=keys[0], caption_key=keys[1]), **overrides)


def array_format(kind: str, **overrides) -> JsonlFormat:
  """The official fine-tuning key names of JSON-array files (docs/data.md), with overrides.

  Image and video kinds: the retrieval files' `image` (a path under image_root; for videos a
  JSON frames file), `caption` and `image_id` keys. Region: the JSON-lines names with paths.
  """
  if kind == F.REGION:
    return default_format(kind, is_image_rpath=True, **overrides)
  base = JsonlFormat(
    image_key="image",
    caption_key="caption",
    is_image_rpath=True,
    image_id_key="image_id",
    frames_file=kind == F.VIDEO,
  )
  return dataclasses.replace(base, **overrides)


def _bad(rid: str, field: str, detail: str) -> F.SkipRecord:
  return F.SkipRecord("bad_field_type", rid, field, detail)


def _read_file(value: str, fmt: JsonlFormat, base_dir: str, rid: str, field: str) -> bytes:
  """The bytes of a relative (to image_root, else base_dir) or absolute path."""
  path = os.path.join(fmt.image_root or base_dir, value)
  try:
    with fileio.open_binary(path) as f:
      return f.read()
  except FileNotFoundError:
    raise F.SkipRecord("missing_image", rid, field, f"no file {path}") from None
  except OSError as e:
    raise F.SkipRecord("missing_image", rid, field, f"cannot read {path}: {e}") from None


def _image_bytes(value: Any, fmt: JsonlFormat, base_dir: str, rid: str, field: str) -> bytes:
  """The encoded image file of one image field: base64 text, or a path when is_image_rpath."""
  if not isinstance(value, str):
    raise _bad(
      rid,
      field,
      f"expected a {'path' if fmt.is_image_rpath else 'base64'} string, got {type(value).__name__}",
    )
  if fmt.is_image_rpath:
    return _read_file(value, fmt, base_dir, rid, field)
  try:
    data = base64.b64decode(value, validate=True)
  except (binascii.Error, ValueError) as e:
    raise F.SkipRecord("corrupt_image", rid, field, f"invalid base64: {e}") from None
  if not data:
    raise F.SkipRecord("corrupt_image", rid, field, "empty image")
  return data


def _captions(value: Any, fmt: JsonlFormat, rid: str, field: str) -> list[str]:
  """Caption alternatives of a str / list[str] / dict language->str value."""
  if isinstance(value, dict):
    if fmt.language is not None:
      if fmt.language not in value:
        raise _bad(rid, field, f"no caption in language {fmt.language!r}")
      value = [value[fmt.language]]
    else:
      value = list(value.values())
  elif isinstance(value, str):
    value = [value]
  if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
    raise _bad(rid, field, f"expected str, list of str or dict of str, got {type(value).__name__}")
  if not value:
    raise F.SkipRecord("empty_caption", rid, field, "empty caption list")
  for c in value:
    if not c.strip():
      raise F.SkipRecord("empty_caption", rid, field, f"caption {c!r} is empty")
  return value


def _str_list(value: Any, rid: str, field: str) -> list[str]:
  """A str or list[str] field (elem captions and attributes), kept as given."""
  if isinstance(value, str):
    return [value]
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise _bad(rid, field, f"expected str or list of str, got {type(value).__name__}")
  return value


def _elem(value: Any, rid: str, field: str) -> dict:
  """One region/object elem: 'bb' [x, y, w, h] pixels, 'caption', opt. 'attributes'."""
  if not isinstance(value, dict):
    raise _bad(rid, field, f"elem is {type(value).__name__}, not an object")
  bb = value.get("bb")
  if (
    not isinstance(bb, list)
    or len(bb) != 4
    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bb)
  ):
    raise _bad(rid, f"{field}.bb", f"expected 4 numbers [x, y, w, h], got {bb!r:.60}")
  if "caption" not in value:
    raise _bad(rid, f"{field}.caption", "missing")
  captions = _str_list(value["caption"], rid, f"{field}.caption")
  if not captions:
    # An elem without any text is unusable but the record's other elems may be fine.
    captions = [""]
  attrs = _str_list(value.get("attributes", []), rid, f"{field}.attributes")
  try:
    box = [float(v) for v in bb]
  except OverflowError:  # JSON integers are unbounded
    raise _bad(rid, f"{field}.bb", f"number too large in {bb!r:.60}") from None
  return {"bb": box, "captions": captions, "attributes": attrs}


def _frames_file(value: Any, fmt: JsonlFormat, base_dir: str, rid: str, field: str) -> list:
  """The frame list held by a JSON frames file (official video retrieval format)."""
  if not isinstance(value, str):
    raise _bad(rid, field, f"expected the path of a frames file, got {type(value).__name__}")
  data = _read_file(value, fmt, base_dir, rid, field)
  try:
    frames = json.loads(data)
  except (ValueError, UnicodeDecodeError) as e:
    raise F.SkipRecord("corrupt_image", rid, field, f"frames file {value}: {e}"[:120]) from None
  if not isinstance(frames, list):
    detail = f"frames file {value} holds a JSON {type(frames).__name__}, not a list of frames"
    raise F.SkipRecord("corrupt_image", rid, field, detail)
  return frames


def _frames(
  value: Any, fmt: JsonlFormat, base_dir: str, rid: str, field: str
) -> tuple[list[list[bytes]], bool]:
  """(clips, given as a list of clips) of 'video_frames': a list of frames (one clip) or a list
  of clips of frames; with `fmt.frames_file` the value names a JSON file holding that list."""
  if fmt.frames_file:
    value = _frames_file(value, fmt, base_dir, rid, field)
    fmt = dataclasses.replace(fmt, is_image_rpath=False, frames_file=False)  # base64 frames
  if not isinstance(value, list):
    raise _bad(rid, field, f"expected a list of frames or clips, got {type(value).__name__}")
  if not value:
    raise F.SkipRecord("empty_video", rid, field, "0 frames")
  if all(isinstance(v, list) for v in value):
    clips = value
  elif all(isinstance(v, str) for v in value):
    clips = [value]
  else:
    raise _bad(rid, field, "mixes frames and clips (or holds non-strings)")
  out = []
  for ci, clip in enumerate(clips):
    if not clip:
      raise F.SkipRecord("empty_video", rid, f"{field}[{ci}]", "clip with 0 frames")
    out.append(
      [_image_bytes(fr, fmt, base_dir, rid, f"{field}[{ci}][{fi}]") for fi, fr in enumerate(clip)]
    )
  return out, clips is value


def _image_id(obj: dict, fmt: JsonlFormat, rid: str) -> dict[str, str]:
  """{'image_id': str} when `fmt.image_id_key` is set and present in the object, else {}."""
  key = fmt.image_id_key
  if key is None or key not in obj:
    return {}
  value = obj[key]
  if not isinstance(value, (str, int)) or isinstance(value, bool) or value == "":
    raise _bad(rid, key, f"expected a non-empty str or an int, got {value!r:.40}")
  return {"image_id": str(value)}


def _video_fields(obj: dict, fmt: JsonlFormat, base_dir: str, rid: str) -> dict[str, Any]:
  """clips, captions and is_continuous of a video object."""
  clips, multi = _frames(obj[fmt.image_key], fmt, base_dir, rid, fmt.image_key)
  captions = _captions(obj[fmt.caption_key], fmt, rid, fmt.caption_key)
  if multi:
    if len(captions) != len(clips):
      raise _bad(rid, fmt.caption_key, f"{len(captions)} captions for {len(clips)} clips")
    if not isinstance(obj.get("is_continuous"), bool):
      raise _bad(rid, "is_continuous", "required bool when frames are clips")
  cont = obj.get("is_continuous", False)
  if not isinstance(cont, bool):
    raise _bad(rid, "is_continuous", f"expected bool, got {type(cont).__name__}")
  return {"clips": clips, "captions": captions, "is_continuous": cont}


def parse_line(
  kind: str, line: str | bytes, rid: str, fmt: JsonlFormat | None = None, base_dir: str = "."
) -> dict:
  """Parses one official JSON line into a canonical record with id `rid` (or the line's "id").

  Raises:
    SkipRecord with one of SKIP_REASONS naming `rid` and the field; nothing else.
  """
  try:
    obj = json.loads(line)
  except (ValueError, UnicodeDecodeError) as e:
    raise F.SkipRecord("bad_json", rid, "<line>", str(e)[:80]) from None
  return parse_object(kind, obj, rid, fmt, base_dir)


def parse_object(
  kind: str, obj: Any, rid: str, fmt: JsonlFormat | None = None, base_dir: str = "."
) -> dict:
  """One parsed JSON value (a line, or an entry of a JSON array) -> canonical record.

  Raises:
    SkipRecord with one of SKIP_REASONS naming `rid` and the field; nothing else.
  """
  fmt = fmt or default_format(kind)
  if not isinstance(obj, dict):
    raise F.SkipRecord("bad_json", rid, "<line>", f"a JSON {type(obj).__name__}, not an object")
  if "id" in obj:
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
      raise _bad(rid, "id", f"expected str or int, got {type(obj['id']).__name__}")
    rid = str(obj["id"])
  for key in (fmt.image_key, fmt.caption_key) if kind != F.REGION else (fmt.image_key, "elems"):
    if key not in obj:
      raise _bad(rid, key, "missing")
  record: dict[str, Any] = {"kind": kind, "id": rid}
  if kind == F.IMAGE:
    record["image"] = _image_bytes(obj[fmt.image_key], fmt, base_dir, rid, fmt.image_key)
    record["captions"] = _captions(obj[fmt.caption_key], fmt, rid, fmt.caption_key)
    record.update(_image_id(obj, fmt, rid))
  elif kind == F.REGION:
    # The official region reader always uses "caption" (our default) for the whole-image
    # caption, which is optional there.
    elems = obj["elems"]
    if not isinstance(elems, list):
      raise _bad(rid, "elems", f"expected a list, got {type(elems).__name__}")
    if not elems:
      raise F.SkipRecord("no_usable_elem", rid, "elems", "empty elems list")
    record["image"] = _image_bytes(obj[fmt.image_key], fmt, base_dir, rid, fmt.image_key)
    cap = fmt.caption_key
    record["captions"] = _captions(obj[cap], fmt, rid, cap) if cap in obj else []
    record["elems"] = [_elem(e, rid, f"elems[{i}]") for i, e in enumerate(elems)]
  elif kind == F.VIDEO:
    record.update(_video_fields(obj, fmt, base_dir, rid))
    record.update(_image_id(obj, fmt, rid))
  else:
    raise ValueError(f"unknown kind {kind!r}; expected one of {F.KINDS}")
  return record


def to_line(
  record: dict,
  fmt: JsonlFormat | None = None,
  image_paths: list[str] | None = None,
  extra: dict | None = None,
) -> str:
  """Serialises a canonical record as one official JSON line (no trailing newline).

  Images are written as base64 unless `image_paths` is given (is_image_rpath data): then those
  strings replace the image (image/region kinds: one path; video: one path per frame, in order).
  Multi-clip videos are written as a list of clips with per-clip captions and "is_continuous".
  `extra` keys (e.g. {"id": ...}) are appended to the JSON object.
  """
  kind = record["kind"]
  fmt = fmt or default_format(kind)
  paths = iter(image_paths) if image_paths is not None else None

  def enc(data: bytes) -> str:
    return next(paths) if paths is not None else base64.b64encode(data).decode("ascii")

  obj = _video_obj(record, fmt, enc) if kind == F.VIDEO else _still_obj(record, fmt, enc)
  if fmt.image_id_key and record.get("image_id") is not None:
    obj[fmt.image_id_key] = record["image_id"]
  obj.update(extra or {})
  return json.dumps(obj)


def _video_obj(record: dict, fmt: JsonlFormat, enc) -> dict[str, Any]:
  """Official video fields: one clip as a flat frame list, several as a list of clips."""
  clips = [[enc(fr) for fr in clip] for clip in record["clips"]]
  caps = list(record["captions"])
  if len(clips) == 1:
    return {
      fmt.image_key: clips[0],
      fmt.caption_key: caps[0] if len(caps) == 1 else caps,
      "is_continuous": bool(record["is_continuous"]),
    }
  return {
    fmt.image_key: clips,
    fmt.caption_key: caps,
    "is_continuous": bool(record["is_continuous"]),
  }


def _still_obj(record: dict, fmt: JsonlFormat, enc) -> dict[str, Any]:
  """Official image-text or region fields."""
  obj: dict[str, Any] = {fmt.image_key: enc(record["image"])}
  caps = list(record["captions"])
  if record["kind"] == F.IMAGE or caps:
    obj[fmt.caption_key] = caps[0] if len(caps) == 1 else caps
  if record["kind"] == F.REGION:
    obj["elems"] = []
    for e in record["elems"]:
      elem = {
        "bb": list(e["bb"]),
        "caption": e["captions"][0] if len(e["captions"]) == 1 else list(e["captions"]),
      }
      if e["attributes"]:
        elem["attributes"] = list(e["attributes"])
      obj["elems"].append(elem)
  return obj
