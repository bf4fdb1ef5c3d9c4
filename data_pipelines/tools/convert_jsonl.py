"""Converter: official JSON lines -> TFDS ArrayRecord dataset of canonical records.

    python -m data_pipelines.tools.convert_jsonl --kind region SRC OUT_DIR [--no-check] ...

SRC is a JSON-lines file or directory (`_SUCCESS` files skipped), or a JSON-array file (the
fine-tuning formats, entries numbered from 1). Bad lines are not written:
each is reported on stderr as `file:line: reason: field: detail` and counted per reason. By
default every record is also checked with `checks.check_record` (images decode, captions
tokenise, a usable region elem exists), so the dataset holds only records that cannot fail
deterministically; `--no-check` keeps the reader-level checks only. The dataset lands in
`OUT_DIR/x2vlm_<kind>/1.0.0/`; record ids ("<file>:<line>" or the line's "id") are kept.
stdout carries only the JSON summary (`... | jq .written` works); everything else goes to
stderr.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import sys

from data_pipelines import features as F
from data_pipelines.jsonl_format import JsonlFormat
from data_pipelines.tools.validate import (
  Problem,
  add_format_args,
  default_tokenizer,
  format_from_args,
  iter_checked,
)


@dataclasses.dataclass
class ConvertStats:
  """What a conversion wrote and skipped."""

  dataset_dir: str
  written: int
  problems: list[Problem]

  @property
  def skipped(self) -> dict[str, int]:
    c = collections.Counter(p.reason for p in self.problems)
    return {r: c[r] for r in F.SKIP_REASONS if c[r]}


def convert(
  src: str,
  out_dir: str,
  kind: str,
  fmt: JsonlFormat | None = None,
  check: bool = True,
  tokenizer=None,
  preproc_cfg: F.PreprocConfig = F.PreprocConfig(),
  split: str = "train",
  log=None,
) -> ConvertStats:
  """Converts JSON lines at `src` to an ArrayRecord dataset under `out_dir`.

  `log(problem)` is called for each bad line (default: print to stderr).
  """
  from data_pipelines import arrayrecord
  from data_pipelines.sources import JsonArraySource, JsonLinesSource, is_json_array

  source = (JsonArraySource if is_json_array(src) else JsonLinesSource)(src, kind, fmt)
  if check and tokenizer is None:
    tokenizer = default_tokenizer(preproc_cfg.max_tokens)
  log = log or (lambda p: print(p, file=sys.stderr))
  problems: list[Problem] = []
  written = [0]

  def good_records():
    for _, record, problem in iter_checked(source, tokenizer, preproc_cfg, check=check):
      if problem is not None:
        problems.append(problem)
        log(problem)
      else:
        written[0] += 1
        yield record

  dataset_dir = arrayrecord.write(good_records(), kind, out_dir, split)
  return ConvertStats(dataset_dir, written[0], problems)


@contextlib.contextmanager
def _stdout_to_stderr():
  """Everything written to stdout (Python prints and C-level writes to fd 1) goes to stderr."""
  sys.stdout.flush()
  saved = os.dup(1)
  try:
    os.dup2(2, 1)
    with contextlib.redirect_stdout(sys.stderr):
      yield
  finally:
    sys.stdout.flush()
    os.dup2(saved, 1)
    os.close(saved)


def main(argv: list[str] | None = None) -> int:
  """CLI entry point; prints a JSON summary and returns 0 (bad lines are expected, not fatal)."""
  parser = argparse.ArgumentParser(
    prog="python -m data_pipelines.tools.convert_jsonl",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("src", help="JSON-lines file or directory, or a JSON-array file")
  parser.add_argument("out_dir", help="output data dir (the dataset goes to OUT_DIR/x2vlm_<kind>/)")
  add_format_args(parser)
  parser.add_argument(
    "--no-check",
    action="store_true",
    help="skip check_record (image decoding, tokenisation, elem usability)",
  )
  parser.add_argument("--tokenizer", help="HF tokenizer dir for the checks (default: MiniLM)")
  parser.add_argument("--max-tokens", type=int, default=F.PreprocConfig().max_tokens)
  parser.add_argument("--split", default="train")
  args = parser.parse_args(argv)
  from data_pipelines.sources import detect_kind, is_json_array

  kind = args.kind or detect_kind(args.src)
  cfg = dataclasses.replace(F.PreprocConfig(), max_tokens=args.max_tokens)
  tok = None if args.no_check else default_tokenizer(args.max_tokens, args.tokenizer)
  with _stdout_to_stderr():  # TFDS prints progress lines; stdout carries the JSON only
    stats = convert(
      args.src,
      args.out_dir,
      kind,
      format_from_args(args, kind, is_json_array(args.src)),
      check=not args.no_check,
      tokenizer=tok,
      preproc_cfg=cfg,
      split=args.split,
    )
  print(
    json.dumps(
      {
        "dataset_dir": stats.dataset_dir,
        "kind": kind,
        "written": stats.written,
        "skipped": stats.skipped,
      }
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
