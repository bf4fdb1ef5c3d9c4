"""Process-level set-up of a run: logging into the workdir and the persistent compilation cache."""

from __future__ import annotations

import logging as py_logging
import os
import pathlib

import jax
from absl import logging


class QuietOrbax(py_logging.Filter):
  """Drops orbax's INFO records (a few dozen lines per checkpoint would bury the progress
  lines) and its warning that a directory is read-only (eval.py asks for that); its other
  warnings and errors pass."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if str(record.msg).startswith("Given directory is read only"):
      return False  # eval.py opens checkpoints read-only on purpose: not worth a warning
    return record.levelno >= py_logging.WARNING


def quiet_orbax() -> QuietOrbax:
  """Filters orbax's INFO records out of the absl console handler (once); returns the filter."""
  absl_handler = logging.get_absl_handler()
  for f in absl_handler.filters:
    if isinstance(f, QuietOrbax):
      return f
  quiet = QuietOrbax()
  absl_handler.addFilter(quiet)
  return quiet


def log_name() -> str:
  """This process's log file: train.log on process 0, train.p<i>.log on the others."""
  return "train.log" if jax.process_index() == 0 else f"train.p{jax.process_index()}.log"


def setup_logging(workdir: pathlib.Path) -> py_logging.Handler:
  """Logs (absl and Python) also to <workdir>/train.log (train.p<i>.log on process i > 0),
  orbax INFO records filtered; returns the handler to remove at the end."""
  handler = py_logging.FileHandler(workdir / log_name())
  handler.setFormatter(py_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  handler.addFilter(quiet_orbax())
  py_logging.getLogger().addHandler(handler)
  logging.set_verbosity(logging.INFO)
  return handler


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA cache for every compiled program (restarts reuse the compiled step)."""
  if not path:
    return
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
