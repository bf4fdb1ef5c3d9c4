"""Converter: our region JSON lines + per-image region features -> MVPTR data in the Oscar/VinVL
layout (`data_pipelines/mvptr_from_regions.py` says what becomes what).

    python -m data_pipelines.tools.mvptr_convert SRC FEATURES_DIR OUT_DIR [--id2phrase F] ...

SRC is a region JSON-lines file or directory (or a JSON-array file); FEATURES_DIR holds one
`<image id or record id>.npy` per record ([n_elems, F] float, one row per elem, any vision
tower's features; characters other than letters, digits, '.', '_' and '-' in the id become
'_'). Bad records are not written: each is reported on stderr as `file:line: reason: field:
detail` and counted per reason. stdout carries only the JSON summary (spec path, images,
captions, skipped, dropped phrases, phrase count). The result validates with
`python -m data_pipelines.tools.validate OUT_DIR/oscar.yaml`.
"""

from __future__ import annotations

import argparse
import json
import sys

from data_pipelines import features as F
from data_pipelines import mvptr_from_regions
from data_pipelines.mvptr_phrases import PhraseTable
from data_pipelines.tools.validate import add_format_args, default_tokenizer, format_from_args


def main(argv: list[str] | None = None) -> int:
  """CLI entry point; prints a JSON summary and returns 0 (bad records are expected, not fatal)."""
  parser = argparse.ArgumentParser(
    prog="python -m data_pipelines.tools.mvptr_convert",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("src", help="region JSON-lines file or directory, or a JSON-array file")
  parser.add_argument("features", help="directory of <id>.npy region features, one row per elem")
  parser.add_argument("out_dir", help="output directory (the spec is OUT_DIR/oscar.yaml)")
  add_format_args(parser)
  parser.add_argument("--id2phrase", help="phrase vocabulary JSON (default: built from the data)")
  parser.add_argument("--min-count", type=int, default=1, help="captions a built phrase needs")
  parser.add_argument("--dataset", default="regions", help="dataset name of the keys (no '_')")
  parser.add_argument("--tokenizer", help="HF tokenizer dir (default: MiniLM, bert-base-uncased)")
  args = parser.parse_args(argv)
  if args.kind not in (None, F.REGION):
    parser.error(f"--kind {args.kind}: this converter reads region records")
  from data_pipelines.sources import JsonArraySource, JsonLinesSource, is_json_array

  array = is_json_array(args.src)
  fmt = format_from_args(args, F.REGION, array)
  source = (JsonArraySource if array else JsonLinesSource)(args.src, F.REGION, fmt)
  summary = mvptr_from_regions.convert_records(
    source,
    args.out_dir,
    mvptr_from_regions.npy_features(args.features),
    default_tokenizer(40, args.tokenizer),
    vocab=PhraseTable.load(args.id2phrase) if args.id2phrase else None,
    dataset=args.dataset,
    min_count=args.min_count,
    log=lambda p: print(p, file=sys.stderr),
  )
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
