"""The real trainer (`train.py`, tiny config) in subprocesses: exact resume after kill -9 and
a corrupt checkpoint (logs line for line as one run; the damaged step moved aside and saved
again), kill -9 before the first commit, preemption of a two-process run, NaN skipping, config
checks (in-process ones: tests/test_resume_checks.py).

Compilation dominates the cost of these tests, so every run shares one persistent XLA cache
(`train.compilation_cache_dir`) and the single-process runs all compile the same step: NaNs are
injected through the batch by the test-only driver `tests/fault_train.py` (train.py plus
`--nan_steps`), the schedule length is fixed so `train.total_steps` can differ between runs,
and XLA's slow backend passes are off (the same flags in every run, so runs stay
bit-comparable with each other).
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from proc_testlib import alive, children

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8
NAN_STEP = 2  # the reference run's update 2 gets a NaN and is skipped
XLA_FLAGS = (
  "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
  "--xla_llvm_disable_expensive_passes=true"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("xla_cache")


def _env():
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=XLA_FLAGS,
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    PYTHONPATH=str(ROOT),
  )
  return env


def _args(workdir, cache, *extra):
  return [
    sys.executable,
    str(ROOT / "tests" / "fault_train.py"),
    "--config=" + str(ROOT / "configs/tiny.py"),
    f"--workdir={workdir}",
    f"--config.train.compilation_cache_dir={cache}",
    f"--config.train.total_steps={STEPS}",
    "--config.optim.total_steps=100",
    "--config.train.log_every=1",
    "--config.train.ckpt_every=1",
    "--config.train.keep=3",
    "--config.train.log_example_ids=True",
    f"--nan_steps={NAN_STEP}",
    "--alsologtostderr",
    *extra,
  ]


def _start(workdir, cache, *extra, log_name="run.log"):
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log = open(workdir.parent / f"{workdir.name}.{log_name}", "ab")
  return subprocess.Popen(
    _args(workdir, cache, *extra), cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT
  ), log


def _run(workdir, cache, *extra, timeout=600):
  proc, log = _start(workdir, cache, *extra)
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  return proc.returncode, _output(workdir)


def _output(workdir) -> str:
  workdir = pathlib.Path(workdir)
  return "".join(
    p.read_text(errors="replace") for p in sorted(workdir.parent.glob(f"{workdir.name}.*.log"))
  )


def _metrics(workdir) -> dict[int, dict]:
  out = {}
  path = pathlib.Path(workdir) / "metrics.jsonl"
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except ValueError:  # a line being written right now
      continue
    out[rec["step"]] = rec["metrics"]
  return out


def _lines(workdir) -> list[tuple[int, dict]]:
  """metrics.jsonl line for line (without the wall time)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [(r["step"], r["metrics"]) for r in map(json.loads, path.read_text().splitlines())]


def _losses(workdir) -> dict[int, float]:
  return {s: m["train/loss/total"] for s, m in _metrics(workdir).items()}


def _ids(workdir, process=0) -> list[dict]:
  path = pathlib.Path(workdir) / f"example_ids.p{process}.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()]


def _ckpt_steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _read_state(workdir, step) -> list[np.ndarray]:
  """Params and optimizer state of a committed checkpoint, as host arrays."""
  import jax
  import orbax.checkpoint as ocp

  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
  with ocp.PyTreeCheckpointer() as ck:
    meta = ck.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = ck.restore(path, restore_args=args)
  return [
    np.asarray(x)
    for x in jax.tree.leaves({"params": tree["train"]["params"], "opt": tree["train"]["opt_state"]})
  ]


def _same_state(workdir, a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(_read_state(workdir, a), _read_state(workdir, b)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """An uninterrupted run of STEPS steps (also fills the compilation cache)."""
  workdir = tmp_path_factory.mktemp("ref") / "run"
  t0 = time.time()
  rc, out = _run(workdir, cache_dir)
  assert rc == 0, out[-4000:]
  print(f"reference run: {time.time() - t0:.1f} s")
  return workdir


def test_reference_run_logs_everything(reference):
  m = _metrics(reference)
  assert sorted(m) == list(range(1, STEPS + 1))
  assert all(np.isfinite(v["train/loss/total"]) for s, v in m.items() if s != NAN_STEP + 1)
  # Update NAN_STEP was skipped: its parameters are those the next step starts from.
  assert [s for s in m if m[s]["train/update_skipped"]] == [NAN_STEP + 1]
  assert m[NAN_STEP + 2]["train/l2_params"] == m[NAN_STEP + 1]["train/l2_params"]
  assert m[NAN_STEP + 3]["train/l2_params"] != m[NAN_STEP + 2]["train/l2_params"]
  assert _ckpt_steps(reference) == [STEPS - 2, STEPS - 1, STEPS]  # keep=3
  ids = _ids(reference)
  assert [r["step"] for r in ids] == list(range(STEPS))
  # Within this first epoch no image record is used twice and no region record's texts
  # come back in a later step.
  images = [tuple(x) for r in ids for x in r["ids"]["image"]]
  assert len(images) == 4 * STEPS and len(set(images)) == len(images)
  per_step = [{tuple(x) for x in r["ids"]["region"]} for r in ids]
  assert sum(len(s) for s in per_step) == len(set().union(*per_step))
  reports = (reference / "reports.txt").read_text()
  assert "sharding report" in reports and "parameter groups" in reports
  assert list(reference.glob("events.out.tfevents.*"))
  out = _output(reference)
  assert "ETA" in out and "ex/s image" in out


def _kill9_and_check_workers(proc) -> None:
  workers = children(proc.pid)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)
  deadline = time.time() + 10
  while time.time() < deadline and any(alive(p) for p in workers):
    time.sleep(0.2)
  left = [p for p in workers if alive(p)]
  for p in left:
    os.kill(p, signal.SIGKILL)
  assert not left, f"worker processes {left} still alive 10 s after kill -9 of the trainer"


def _wait_for(pred, proc, timeout=600, period=0.02):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if pred():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(period)
  return False


def _flip_byte(workdir, step) -> None:
  """Flips one byte in the largest array-data file of checkpoint `step`."""
  files = sorted(
    (
      p
      for p in (pathlib.Path(workdir) / "checkpoints" / str(step) / "state").rglob("*")
      if p.is_file() and "/d/" in str(p)
    ),
    key=lambda p: -p.stat().st_size,
  )
  assert files, f"no array data files in checkpoint {step}"
  raw = bytearray(files[0].read_bytes())
  raw[len(raw) // 2] ^= 0x40
  files[0].write_bytes(bytes(raw))


def test_kill9_during_async_save_then_corrupt_latest_resume_is_exact(
  reference, cache_dir, tmp_path
):
  """kill -9 at a random step while that step's async save is in flight (workers must exit);
  then a byte of the newest committed checkpoint is flipped: the restart rejects it, resumes
  from the one before, and every later loss and every consumed example id equals the
  uninterrupted run's."""
  workdir = tmp_path / "run"
  kill_at = random.Random().choice([4, 5, 6])
  workers = "--config.data.num_workers=1"
  proc, log = _start(workdir, cache_dir, workers)
  ckpts = workdir / "checkpoints"
  in_flight = lambda: (
    ckpts.exists()
    and any(p.name.startswith(f"{kill_at}.orbax-checkpoint-tmp") for p in ckpts.iterdir())
  )
  try:
    assert _wait_for(in_flight, proc), _output(workdir)[-4000:]
    _kill9_and_check_workers(proc)
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  committed = _ckpt_steps(workdir)
  assert committed and committed[-1] in (kill_at - 1, kill_at), committed
  latest = committed[-1]
  _flip_byte(workdir, latest)
  rc, out = _run(workdir, cache_dir, workers, "--config.train.keep=20")
  assert rc == 0, out[-4000:]
  assert f"step {latest} is corrupt: file state/" in out, out[-4000:]
  assert f"resumed from step {committed[-2]}" in out, out[-4000:]
  # The damaged step was moved aside, not deleted, and the run saved that step again.
  moved = [p.name for p in (workdir / "checkpoints").iterdir() if ".corrupt-" in p.name]
  assert [m.split(".")[0] for m in moved] == [str(latest)], moved
  assert _ckpt_steps(workdir) == list(range(committed[0], STEPS + 1)), _ckpt_steps(workdir)
  # The logs read like the uninterrupted run's, line for line.
  assert _lines(workdir) == _lines(reference), f"killed at step {kill_at}"
  assert _ids(workdir) == _ids(reference)


def test_kill9_before_the_first_commit_logs_like_one_run(reference, cache_dir, tmp_path):
  """kill -9 after two steps, before any checkpoint was committed: the restart begins at step 0
  and its metrics.jsonl and example ids equal the uninterrupted run's line for line."""
  workdir = tmp_path / "run"
  proc, log = _start(workdir, cache_dir, "--config.train.ckpt_every=100")
  try:
    logged = lambda: (workdir / "metrics.jsonl").exists() and 2 in _metrics(workdir)
    assert _wait_for(logged, proc), _output(workdir)[-4000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  assert _ckpt_steps(workdir) == [] and len(_ids(workdir)) >= 2
  rc, out = _run(workdir, cache_dir)
  assert rc == 0 and "start at step 0" in out, out[-4000:]
  assert _lines(workdir) == _lines(reference)
  assert _ids(workdir) == _ids(reference)


def test_nan_updates_skipped_then_run_stops(reference, cache_dir, tmp_path):
  """Continues the reference run with NaNs at updates 9, 10, 11 and at most 3 in a row: 9 and
  10 are skipped with params and optimizer state bit-unchanged; 11 stops the run (non-zero
  exit) without writing a checkpoint."""
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  rc, out = _run(
    workdir,
    cache_dir,
    "--config.train.total_steps=14",
    "--nan_steps=9,10,11",
    "--config.train.max_consecutive_nonfinite=3",
    "--config.train.keep=10",
  )
  assert rc != 0 and "3 consecutive non-finite updates" in out, out[-4000:]
  assert "the newest intact checkpoint is step 11: a relaunch resumes there" in out, out[-4000:]
  m = _metrics(workdir)
  assert [s for s in sorted(m) if s > STEPS and m[s]["train/update_skipped"]] == [10, 11]
  assert _ckpt_steps(workdir) == [6, 7, 8, 9, 10, 11]  # nothing after the third NaN
  assert not _same_state(workdir, 8, 9)
  assert _same_state(workdir, 9, 10) and _same_state(workdir, 10, 11)


def test_gradient_accumulation_reads_micro_batches_in_order(reference, cache_dir, tmp_path):
  """accum_steps=2: each update reads two micro-batches of half the global batch, in the order
  the un-accumulated run reads its records, and trains on them."""
  workdir = tmp_path / "run"
  rc, out = _run(workdir, cache_dir, "--config.train.accum_steps=2", "--config.train.total_steps=3")
  assert rc == 0, out[-4000:]
  ids = _ids(workdir)
  assert [(r["step"], r["micro"]) for r in ids] == [(s, i) for s in range(3) for i in range(2)]
  images = [tuple(x) for r in ids for x in r["ids"]["image"]]
  assert all(len(r["ids"]["image"]) == 2 for r in ids)  # global batch 4 = 2 micro-batches of 2
  ref = [tuple(x) for r in _ids(reference)[:3] for x in r["ids"]["image"]]
  assert images == ref
  m = _metrics(workdir)
  assert sorted(m) == [1, 2, 3] and m[3]["train/update_skipped"] == 1  # NaN in step 2's data
  assert all(np.isfinite(m[s]["train/loss/total"]) for s in (1, 2))
  # l2_params is logged before each update; update 0 has lr 0 (warm-up), update 1 moves.
  assert m[3]["train/l2_params"] != m[2]["train/l2_params"]


def test_changed_critical_config_refused(reference, cache_dir, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  rc, out = _run(workdir, cache_dir, "--config.train.seed=7", "--config.batch.image=8")
  assert rc != 0 and "ConfigChangedError" in out, out[-3000:]
  assert "train.seed: 42 -> 7" in out and "batch.image: 4 -> 8" in out, out[-3000:]
  assert _ckpt_steps(workdir) == _ckpt_steps(reference)


def test_unknown_config_key_rejected(tmp_path, cache_dir):
  rc, out = _run(tmp_path / "run", cache_dir, "--config.optim.lrr=0.1", timeout=120)
  assert rc != 0 and "lrr" in out, out[-3000:]
  assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# Two processes (gloo): preemption.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_pair(workdir, cache, tag):
  port = _free_port()
  procs = []
  for i in range(2):
    # Image kind only: the two-process program is compiled separately, keep it small.
    procs.append(
      _start(
        workdir,
        cache,
        "--config.batch.region=0",
        "--config.train.ckpt_every=5",
        "--config.batch.region_max_images=0",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        "--cpu_collectives=gloo",
        log_name=f"{tag}.p{i}.log",
      )
    )
  return procs


def _finish_pair(procs, timeout=600):
  deadline = time.time() + timeout
  try:
    for p, _ in procs:
      p.wait(timeout=max(1, deadline - time.time()))
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
      log.close()
  return [p.returncode for p, _ in procs]


def test_sigterm_two_processes_save_same_step_and_resume(cache_dir, tmp_path):
  ref = tmp_path / "ref"
  rcs = _finish_pair(_start_pair(ref, cache_dir, "a"))
  assert rcs == [0, 0], _output(ref)[-4000:]
  run = tmp_path / "run"
  procs = _start_pair(run, cache_dir, "a")
  try:
    started = lambda: (run / "metrics.jsonl").exists() and 3 in _metrics(run)
    assert _wait_for(started, procs[0][0], period=0.05), _output(run)[-4000:]
    os.kill(procs[1][0].pid, signal.SIGTERM)
  finally:
    rcs = _finish_pair(procs)
  assert rcs == [0, 0], _output(run)[-4000:]
  out = _output(run)
  saved = {
    int(l.split("saving step ")[1].split()[0])
    for l in out.splitlines()
    if "preemption notice: saving step" in l
  }
  assert len(saved) == 1 and out.count("preemption notice: saving step") >= 2, out[-4000:]
  step = saved.pop()
  assert 3 <= step < STEPS and _ckpt_steps(run)[-1] == step
  rcs = _finish_pair(_start_pair(run, cache_dir, "b"))
  assert rcs == [0, 0], _output(run)[-4000:]
  assert _losses(run) == _losses(ref)
  for p in range(2):
    assert _ids(run, p) == _ids(ref, p)
