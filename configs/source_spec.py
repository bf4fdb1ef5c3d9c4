"""Data sources written as one string, so released configs can be pointed at data from flags.

ml_collections cannot override a list field from the command line, and every source list of a
config is one (`data.image`, `data.region`, `data.video`, `data.aux.<kind>`, `eval.<name>.data`
and its splits). Importing this module (every config does, through `configs.common`) registers a
parser for list fields that reads either JSON (a list of entry objects) or this compact spec:

  ENTRY[,ENTRY...]          ENTRY = TYPE:PATH[@WEIGHT][;KEY=VALUE...]

  --config.data.image='jsonl:/data/coco@0.5,jsonl:/data/vg;image_root=/data/vg/images'
  --config.data.region='refcoco:/data/refcoco+/train.json;refs=/data/refs(unc).p;instances=...'
  --config.data.image='synthetic:256@2;seed=3'          (synthetic: PATH is the record count)
  --config.eval.retrieval.data='[{"type": "json", "path": "/data/coco_test.json"}]'

TYPE is a source type of `data_pipelines/source_specs.py` (jsonl, json, refcoco, arrayrecord,
synthetic, vqa, nlvr2, video_qa); PATH may be a cloud URL (`gs://...`: only the first ':'
separates the type); WEIGHT is the mixture weight; KEY=VALUE pairs are the entry's other keys
(numbers are read as numbers). An empty string gives an empty list. Paths holding ',' '@' or ';'
need the JSON form. docs/training.md#data-and-evaluators-from-the-command-line.
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from data_pipelines.source_specs import SOURCE_KEYS


def _number_or_text(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def _entry(text: str) -> dict:
  head, *pairs = text.split(";")
  typ, sep, rest = head.partition(":")
  typ = typ.strip()
  if not sep or typ not in SOURCE_KEYS:
    raise ValueError(
      f"source {text!r}: expected TYPE:PATH[@WEIGHT][;KEY=VALUE...] with TYPE one of "
      f"{sorted(SOURCE_KEYS)}"
    )
  entry: dict = {"type": typ}
  target, at, weight = rest.rpartition("@")
  if at:
    try:
      entry["weight"] = float(weight)
    except ValueError:
      raise ValueError(f"source {text!r}: weight {weight!r} after '@' is not a number") from None
    rest = target
  if typ == "synthetic":
    entry["size"] = int(rest)
  else:
    entry["path"] = rest.strip()
  for pair in pairs:
    key, eq, value = pair.partition("=")
    if not eq or key.strip() not in SOURCE_KEYS[typ]:
      raise ValueError(
        f"source {text!r}: {pair!r} is not KEY=VALUE with a {typ} key "
        f"({sorted(SOURCE_KEYS[typ] - {'type'})})"
      )
    entry[key.strip()] = _number_or_text(value.strip())
  return entry


def parse_sources(spec: str) -> list[dict]:
  """A list of source entries from the compact spec or JSON (see the module docstring)."""
  spec = spec.strip()
  if spec.startswith("["):
    entries = json.loads(spec)
    if not all(isinstance(e, dict) and "type" in e for e in entries):
      raise ValueError(f"{spec!r}: a JSON source list holds objects with a 'type'")
    return entries
  return [_entry(part.strip()) for part in spec.split(",") if part.strip()]


class SourceListParser(flags.ArgumentParser):
  """Flag parser of list-valued config fields (source lists)."""

  def parse(self, argument):
    return list(argument) if isinstance(argument, (list, tuple)) else parse_sources(argument)

  def flag_type(self) -> str:
    return "source list"


config_flags.register_flag_parser_for_type(list, SourceListParser())
