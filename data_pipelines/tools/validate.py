"""Validator: lists every bad record of a data source and counts them per skip reason.

    python -m data_pipelines.tools.validate PATH [--kind K] [--tokenizer DIR] [--rpath] ...
    python -m data_pipelines.tools.validate SPLIT.json --refs REFS.p --instances INST.json ...

PATH is a JSON-lines file or directory, a JSON-array file (the fine-tuning formats; entries are
numbered from 1), an ArrayRecord dataset directory, with --refs/--instances a RefCOCO-style
split file (region records, boxes kept exact as in grounding fine-tuning), or an MVPTR
Oscar/VinVL dataset spec (a `.yaml`/`.yml` file, or any file with --oscar; every corpus line is
read as `mvptr_oscar.OscarSource` reads it: features, labels, phrases, tokenisation; the
pre-training counts then come from the reader alone), or with --mvptr-task an MVPTR VQA / SNLI-VE
task spec (`mvptr_task_sources.TaskSource`, likewise). Every other record is read (reader
faults: bad JSON, wrong types, missing/corrupt images, empty captions, empty videos) and
checked with `checks.check_record` (decoding, captions that clean or tokenise to nothing,
unusable region elems). Each bad record prints as `file:line: reason: field: detail`
(ArrayRecord: `dataset_dir:index`), then the per-reason counts; the exit code is 1 if any
record is bad.

Exit codes: 0 every record is good; 1 bad records were found (listed); 2 usage error (bad
arguments, argparse's convention); 3 the input cannot be read at all (missing path, not a
recognised format, unreadable refs/instances file or MVPTR spec), reported on one line on stderr.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import sys
from typing import Any, NamedTuple

from data_pipelines import checks
from data_pipelines import features as F
from data_pipelines.jsonl_format import JsonlFormat, array_format, default_format

EXIT_OK, EXIT_BAD_RECORDS, EXIT_USAGE, EXIT_UNREADABLE = 0, 1, 2, 3


class Problem(NamedTuple):
  """One bad record: where it is, which reason, which field, and the record id."""

  location: str  # "file:line" (JSON lines, 1-based) or "dataset_dir:index" (ArrayRecord)
  reason: str
  field: str
  detail: str
  record_id: str

  def __str__(self) -> str:
    return f"{self.location}: {self.reason}: {self.field}: {self.detail} (id {self.record_id})"


@dataclasses.dataclass
class Report:
  """Result of a validation run."""

  total: int
  problems: list[Problem]

  @property
  def counts(self) -> dict[str, int]:
    """Per-reason counts, in SKIP_REASONS order (reasons with 0 omitted)."""
    c = collections.Counter(p.reason for p in self.problems)
    return {r: c[r] for r in F.SKIP_REASONS if c[r]}


@functools.lru_cache(maxsize=4)
def default_tokenizer(max_tokens: int = 40, directory: str | None = None):
  """The MiniLM (bert-base-uncased vocabulary) word-piece tokenizer, or the one in `directory`.

  Cached: loading takes seconds and the tokenizer is only read.
  """
  from data_pipelines.text_ops import Tokenizer

  if directory is None:
    from data_pipelines.assets import minilm_dir

    directory = minilm_dir()
  return Tokenizer(directory, max_tokens)


def iter_checked(source, tokenizer: Any, preproc_cfg: F.PreprocConfig, check: bool = True):
  """Yields (index, record or None, Problem or None) for every record of a source."""
  for i in range(len(source)):
    path, pos = source.location(i)
    try:
      record = source[i]
      if check:
        checks.check_record(record, tokenizer, preproc_cfg)
      yield i, record, None
    except F.SkipRecord as e:
      yield i, None, Problem(f"{path}:{pos}", e.reason, e.field, e.detail, e.record_id)


def validate(
  path: str,
  kind: str | None = None,
  tokenizer: Any = None,
  preproc_cfg: F.PreprocConfig = F.PreprocConfig(),
  fmt: JsonlFormat | None = None,
) -> Report:
  """Reads and checks every record of `path`; see the module docstring."""
  from data_pipelines.sources import open_source

  return validate_source(open_source(path, kind, fmt), tokenizer, preproc_cfg)


def validate_source(
  source, tokenizer: Any = None, preproc_cfg: F.PreprocConfig = F.PreprocConfig(), check=True
) -> Report:
  """Reads and checks every record of a source with `location(i)` (any reader here); `check`
  False: the reader's own checks only (MVPTR records are not canonical records)."""
  tokenizer = tokenizer or default_tokenizer(preproc_cfg.max_tokens)
  checked = iter_checked(source, tokenizer, preproc_cfg, check)
  problems = [p for _, _, p in checked if p is not None]
  return Report(total=len(source), problems=problems)


def add_format_args(parser: argparse.ArgumentParser) -> None:
  """Flags for the JSON-lines key names and image storage (shared with convert_jsonl)."""
  parser.add_argument("--kind", choices=F.KINDS, help="record kind (inferred when omitted)")
  parser.add_argument("--image-key", help="image / frames key (default: binary, video_frames)")
  parser.add_argument("--caption-key", help="caption key (default: desc, caption, text)")
  parser.add_argument("--rpath", action="store_true", help="images are file paths, not base64")
  parser.add_argument(
    "--image-root",
    help="base dir of relative image paths (default: the directory of each JSON-lines file)",
  )
  parser.add_argument("--language", help="pick this language of dict captions")
  parser.add_argument(
    "--image-id-key", help="key of the image id / video index (JSON arrays default: image_id)"
  )


def format_from_args(args: argparse.Namespace, kind: str, array: bool = False) -> JsonlFormat:
  """The JsonlFormat selected by `add_format_args` flags (`array`: a JSON-array file, whose
  defaults are the fine-tuning ones, image paths included)."""
  overrides = {
    "image_root": args.image_root,
    "language": args.language,
    "is_image_rpath": args.rpath or array,
  }
  for key in ("image_key", "caption_key", "image_id_key"):
    if getattr(args, key):
      overrides[key] = getattr(args, key)
  return (array_format if array else default_format)(kind, **overrides)


def _refcoco_args(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("RefCOCO-style grounding (PATH = the split JSON array)")
  group.add_argument("--refs", help="REFER refs pickle, refs(unc).p")
  group.add_argument("--instances", help="COCO-style instances.json")
  group.add_argument("--split", help="keep only refs of this split (val, testA, testB, ...)")


def _open(args: argparse.Namespace):
  """(source, preproc exact_boxes, canonical records to check) for the command line."""
  from data_pipelines.sources import detect_kind, is_arrayrecord, is_json_array, open_source

  if args.refs or args.instances:
    from data_pipelines.refcoco import RefcocoSource

    src = RefcocoSource(args.path, args.refs, args.instances, args.image_root, args.split)
    return src, True, True
  if args.mvptr_task:
    from data_pipelines.mvptr_task_sources import TaskSource

    return TaskSource(args.path, default_tokenizer(args.max_tokens, args.tokenizer)), False, False
  if args.oscar or str(args.path).endswith((".yaml", ".yml")):
    from data_pipelines.mvptr_oscar import OscarSource

    tok = default_tokenizer(args.max_tokens, args.tokenizer)
    return OscarSource(args.path, tok, data_dir=args.data_dir), False, False
  kind = args.kind
  if kind is None and not is_arrayrecord(args.path):
    kind = detect_kind(args.path)
  array = kind is not None and not is_arrayrecord(args.path) and is_json_array(args.path)
  fmt = format_from_args(args, kind, array) if kind else None
  return open_source(args.path, kind, fmt), False, True


def main(argv: list[str] | None = None) -> int:
  """CLI entry point; returns the exit code."""
  parser = argparse.ArgumentParser(
    prog="python -m data_pipelines.tools.validate",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("path", help="JSON-lines file/dir or ArrayRecord dataset dir")
  add_format_args(parser)
  parser.add_argument(
    "--tokenizer", help="HF tokenizer dir (default: MiniLM, bert-base-uncased vocab)"
  )
  parser.add_argument(
    "--max-tokens",
    type=int,
    default=F.PreprocConfig().max_tokens,
    help="max_words of pre_caption (= max_tokens in pre-training)",
  )
  parser.add_argument("--quiet", action="store_true", help="print only the counts")
  _refcoco_args(parser)
  parser.add_argument("--oscar", action="store_true", help="PATH is an MVPTR dataset spec")
  parser.add_argument("--data-dir", help="MVPTR spec: base of the feature paths (--data_dir)")
  parser.add_argument("--mvptr-task", action="store_true", help="PATH is a VQA / VE task spec")
  args = parser.parse_args(argv)
  try:
    source, exact, check = _open(args)
  except (OSError, ValueError) as e:  # nothing to validate: not a report of bad records
    print(f"validate: {args.path}: {e}", file=sys.stderr)
    return EXIT_UNREADABLE
  cfg = dataclasses.replace(F.PreprocConfig(), max_tokens=args.max_tokens, exact_boxes=exact)
  tokenizer = default_tokenizer(args.max_tokens, args.tokenizer)
  report = validate_source(source, tokenizer, cfg, check)
  if not args.quiet:
    for p in report.problems:
      print(p)
  print(f"{report.total} records, {len(report.problems)} bad")
  for reason, n in report.counts.items():
    print(f"  {reason}: {n}")
  return EXIT_BAD_RECORDS if report.problems else EXIT_OK


if __name__ == "__main__":
  sys.exit(main())
