"""Test set-up: 8 simulated CPU devices (must be set before JAX initialises).

The suite runs tiny models, so XLA's slow backend optimisations buy nothing but compile time on
the 2-core CI machine; they are switched off for the whole session (subprocesses inherit it).
"""

import os
import shutil
import tempfile

_XLA_TEST_FLAGS = (
  "--xla_force_host_platform_device_count=8 "
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
os.environ.setdefault("XLA_FLAGS", _XLA_TEST_FLAGS)
# One persistent XLA cache for the whole session: both pytest workers and every subprocess that
# names no cache of its own (eval.py, converters) read it, so a program compiled once (the same
# tiny step built again by another test file after `_drop_compiled_code`, the same evaluator in
# two demo runs) is loaded instead of compiled again. Made by the controller (workers inherit the
# variable) and removed at its end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="x2vlm_test_xla_cache_")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


# The longest test files, longest first: `make test` hands whole files to two workers in
# collection order (`--dist loadfile --no-loadscope-reorder`), so starting these first keeps one
# worker from finishing a long file alone at the end.
SLOW_FIRST = (
  "test_demo.py",  # the pre-training demo, then the fine-tuning demo from its run
  "test_easy_vqa.py",
  "test_xlmr_finetune.py",
  "test_caption_finetune.py",
  "test_launch_run.py",
  "test_finetune_tasks.py",
  "test_finetune_qa.py",
  "test_train_faults.py",
  "test_mvptr_train.py",  # four train.py runs of the two MVPTR stages
  "test_mvptr_finetune_loop.py",  # a stage run, then a stopped and resumed retrieval fine-tune
)


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # the controller, after the workers
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_code():
  """Free each test file's compiled executables (and the arrays their closures captured) when it
  ends: without this a worker's memory only grows over the session (11 GB seen by the end)."""
  yield
  import gc

  import jax

  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def demo_ci(tmp_path_factory):
  """`python -m x2vlm_jax.demo --ci` once per session (tests/test_demo.py checks it; the
  fine-tuning demo test starts from its run): its summary, plus '_work' and '_stdout'."""
  work = tmp_path_factory.mktemp("demo")
  env = dict(os.environ)
  # One CPU device and XLA's default options, exactly as `make demo` runs on a user's machine
  # (not the suite's fast-compiling flags: over 60 steps the optimised step code saves far more
  # than its longer compile costs).
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [sys.executable, "-m", "x2vlm_jax.demo", "--ci", f"--workdir={work}"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1500,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  out = json.loads((work / "summary.json").read_text())
  out["_work"] = work
  out["_stdout"] = proc.stdout
  return out
