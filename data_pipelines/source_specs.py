"""Config entries -> random-access sources (`build_source`, re-exported by `mixture`).

One entry is a mapping with a 'type' and the keys of that type (docs/data.md#source-entries):

  jsonl        official JSON-lines files (pre-training formats)
  json         official JSON-array files (fine-tuning: image-text and video-text retrieval)
  refcoco      RefCOCO-style grounding (split JSON + REFER refs pickle + COCO instances)
  arrayrecord  a TFDS ArrayRecord dataset written by `arrayrecord.write`
  synthetic    the in-memory shapes world
  vqa, nlvr2, video_qa   the official VQA / NLVR2 / MSRVTT-QA and MSVD-QA files
               (`task_sources.py`)

Every type also takes 'weight' (mixture weight, read by `mixture.make_train_iterator`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from data_pipelines import features as F

_COMMON_KEYS = {"type", "path", "weight"}
# JsonlFormat fields settable per entry (top level or under 'keys').
_FORMAT_KEYS = {
  "image_key",
  "caption_key",
  "is_image_rpath",
  "image_root",
  "language",
  "image_id_key",
  "frames_file",
}
_REFCOCO_KEYS = {"refs", "instances", "image_root", "split", "image_key", "text_key", "ref_key"}
SOURCE_KEYS = {
  "jsonl": _COMMON_KEYS | _FORMAT_KEYS | {"keys", "index_cache_dir"},
  "json": _COMMON_KEYS | _FORMAT_KEYS | {"keys"},
  "refcoco": _COMMON_KEYS | _REFCOCO_KEYS,
  "arrayrecord": _COMMON_KEYS | {"split"},
  "synthetic": _COMMON_KEYS | {"size", "seed", "world"},
  "vqa": _COMMON_KEYS | {"image_root", "vg_root"},
  "nlvr2": _COMMON_KEYS | {"image_root"},
  "video_qa": _COMMON_KEYS | {"ans2label", "frames_root", "naming"},
}
_TASK_KIND = {"vqa": F.IMAGE, "nlvr2": F.IMAGE, "video_qa": F.VIDEO}


def _format(kind: str, spec: Mapping[str, Any], base):
  """The JsonlFormat of a jsonl / json entry: `base(kind)` with the entry's key overrides."""
  keys = {k: spec[k] for k in _FORMAT_KEYS if k in spec}
  keys.update(dict(spec.get("keys", {})))
  unknown = set(keys) - _FORMAT_KEYS
  if unknown:
    raise ValueError(f"{kind} {spec['type']} source: unknown format keys {sorted(unknown)}")
  return base(kind, **keys)


def build_source(kind: str, spec: Mapping[str, Any]):
  """One random-access source from its config entry.

  spec['type']:
    'jsonl':       path (file or directory); optional key names image_key / caption_key /
                   image_id_key / is_image_rpath / image_root / language / frames_file (top level
                   or under 'keys', defaults: the released names of the kind), index_cache_dir.
    'json':        path (a JSON-array file or a directory of them); the same key options, with
                   the official fine-tuning defaults (`jsonl_format.array_format`).
    'refcoco':     kind 'region'; path (split JSON array), refs (refs(unc).p), instances
                   (instances.json), image_root, optional split ('val' / 'testA' / ... or a
                   list), image_key / text_key / ref_key (default image / text / ref_id).
    'arrayrecord': path of a TFDS ArrayRecord dataset written by arrayrecord.write; split.
    'synthetic':   size (records), seed (world seed), world (WorldConfig fields).
  """
  typ = spec.get("type")
  if typ not in SOURCE_KEYS:
    raise ValueError(f"{kind} source {dict(spec)}: type must be one of {sorted(SOURCE_KEYS)}")
  unknown = set(spec) - SOURCE_KEYS[typ]
  if unknown:
    raise ValueError(f"{kind} {typ} source: unknown keys {sorted(unknown)}")
  # pylint: disable=g-import-not-at-top
  if typ == "synthetic":
    from data_pipelines import synthetic

    if "size" not in spec:
      raise ValueError(f"{kind} synthetic source: 'size' (number of records) is required")
    world = synthetic.ShapesWorld(
      synthetic.WorldConfig(**dict(spec.get("world", {}))),
      seed=int(spec.get("seed", synthetic.TRAIN_SEED)),
    )
    return synthetic.SyntheticSource(kind, int(spec["size"]), world)
  if "path" not in spec:
    raise ValueError(f"{kind} {typ} source: 'path' is required")
  if typ == "arrayrecord":
    from data_pipelines import arrayrecord

    src = arrayrecord.ArrayRecordSource(spec["path"], split=spec.get("split", "train"))
    if src.kind != kind:
      raise ValueError(f"{spec['path']}: holds {src.kind!r} records, listed under {kind!r}")
    return src
  if typ in _TASK_KIND:
    from data_pipelines import task_sources

    if kind != _TASK_KIND[typ]:
      raise ValueError(f"a {typ} source yields {_TASK_KIND[typ]} records, listed under {kind!r}")
    args = {k: v for k, v in spec.items() if k not in ("type", "weight")}
    cls = {
      "vqa": task_sources.VqaSource,
      "nlvr2": task_sources.Nlvr2Source,
      "video_qa": task_sources.VideoQaSource,
    }
    return cls[typ](**args)
  if typ == "refcoco":
    from data_pipelines import refcoco

    if kind != F.REGION:
      raise ValueError(f"a refcoco source yields region records, listed under {kind!r}")
    return refcoco.RefcocoSource(**{k: v for k, v in spec.items() if k not in ("type", "weight")})
  from data_pipelines import jsonl_format, sources

  if typ == "json":
    return sources.JsonArraySource(
      spec["path"], kind, _format(kind, spec, jsonl_format.array_format)
    )
  return sources.JsonLinesSource(
    spec["path"],
    kind,
    _format(kind, spec, jsonl_format.default_format),
    index_cache_dir=spec.get("index_cache_dir"),
  )
