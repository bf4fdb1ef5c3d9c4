"""Command-line failures a person can read: `train.py` and `eval.py` parse their flags here.

A misspelt config override (`--config.optim.lrr=1`) makes ml_collections raise an AttributeError
whose message is the repr of a two-line string, at the end of a 50-line traceback. `parse_flags`
turns any error of flag parsing (unknown flag, unknown config field, bad value, a config file
that refuses its argument) into one line on stderr and exit status 2, the convention for usage
errors; a `Did you mean` suggestion is kept.
"""

from __future__ import annotations

import os
import re
import sys

from absl import flags

USAGE_ERROR = 2


def one_line(error: BaseException) -> str:
  """The error's message on one line, without repr quoting ('\\'lrr\\'\\nDid you mean...')."""
  text = " ".join(str(a) for a in error.args) if error.args else type(error).__name__
  if isinstance(error, (AttributeError, KeyError)):
    text = text.strip("'\"").replace("\\'", "'").replace("\\n", "\n")
  if "Traceback (most recent call last)" in text:  # ml_collections wraps the config's own error
    head = text.split(": ", 1)[0] if text.startswith("flag ") else ""
    text = (head + ": " if head else "") + text.strip().splitlines()[-1].strip()
  m = re.match(r"^'?([^'\n]+)'?\s*\n?\s*(Did you mean .*)$", text, flags=re.S)
  if m:
    text = f"unknown field '{m.group(1)}'; {m.group(2).strip()}"
  return re.sub(r"\s*\n\s*", "; ", text.strip())


def _culprit(argv: list[str], text: str) -> str:
  """The command-line argument the message is about (the override naming the field)."""
  m = re.search(r"unknown field '([^']+)'", text)
  if m:
    for arg in argv:
      name = arg.split("=", 1)[0]
      if name.startswith("--config.") and name.rsplit(".", 1)[-1] == m.group(1):
        return arg
  return ""


def parse_flags(argv: list[str]) -> list[str]:
  """`flags.FLAGS(argv)`; on any parsing error one line on stderr and exit 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # every parse failure is a usage error of this command
    text = one_line(e)
    arg = _culprit(argv, text)
    prog = os.path.basename(argv[0]) if argv else "x2vlm"
    print(f"{prog}: {arg + ': ' if arg else ''}{text}", file=sys.stderr)
    sys.exit(USAGE_ERROR)
