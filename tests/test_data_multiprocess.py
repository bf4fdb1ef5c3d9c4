"""Pipelines across processes: JAX host sharding with two real processes, and worker clean-up.

Run as a script, this file plays the child roles:
  host <process_id> <port> : one of two JAX processes (gloo CPU collectives); prints JSON
  parent                   : builds a pipeline with 2 worker processes, prints READY, sleeps
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from proc_testlib import alive, children

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
N_IMAGE, N_REGION = 23, 7


def _sizes():
  from data_pipelines import features as F

  return F.BatchSizes(
    image_res=16,
    patch_size=8,
    max_tokens=16,
    max_masks=4,
    image_batch=4,
    region_batch=6,
    region_max_images=2,
  )


def _pre():
  from data_pipelines import features as F

  return F.PreprocConfig(image_res=16, patch_size=8, max_tokens=16, max_masks=4, max_regions=3)


def _valid_ids(batch):
  from data_pipelines import features as F

  v = batch[F.VALID] == 1
  return [[int(s), int(r)] for s, r in zip(batch[F.SOURCE_ID][v], batch[F.RECORD_ID][v])]


def _host(process_id: int, port: int) -> None:
  """One JAX process: reads its shard (an image and a region epoch) and globalises a batch."""
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
  )
  from test_data_mixture_fakes import fake_make_example

  from data_pipelines import features as F
  from data_pipelines import mixture
  from x2vlm_jax import global_batch, sharding

  sizes, out = _sizes(), {"process_index": jax.process_index()}
  only = {
    F.IMAGE: F.BatchSizes(**{**sizes.__dict__, "region_batch": 0, "region_max_images": 0}),
    F.REGION: F.BatchSizes(**{**sizes.__dict__, "image_batch": 0}),
  }
  # One training epoch per kind, one iterator each (as the trainer builds them); the shard comes
  # from jax.process_index/count.
  first = {}
  for kind, n in ((F.IMAGE, N_IMAGE), (F.REGION, N_REGION)):
    cfg = {kind: [{"type": "synthetic", "size": n}], "num_epochs": 1}
    it = mixture.make_train_iterator(
      cfg, only[kind], _pre(), None, seed=3, make_example=fake_make_example
    )
    batches = [b[kind] for b in it]
    first[kind] = batches[0]
    out[kind] = [i for b in batches for i in _valid_ids(b)]
  # Global arrays over the 2 x 2 devices of both processes.
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  local = first
  g = global_batch.put([local], mesh)
  out["global_shapes"] = {k: {n: list(a.shape) for n, a in f.items()} for k, f in g.items()}
  idx = g[F.REGION][F.IMAGE_INDEX]
  mine = np.concatenate(
    [np.asarray(s.data) for s in sorted(idx.addressable_shards, key=lambda s: s.index[0].start)]
  )
  out["index_shift"] = (mine - local[F.REGION][F.IMAGE_INDEX]).tolist()
  print("RESULT " + json.dumps(out), flush=True)
  jax.distributed.shutdown()


def _parent() -> None:
  """Builds a pipeline with 2 workers, takes one batch, then waits to be killed."""
  from test_data_mixture_fakes import ListSource, fake_make_example, make_records

  from data_pipelines import features as F
  from data_pipelines import mixture

  sizes = F.BatchSizes(**{**_sizes().__dict__, "region_batch": 0, "region_max_images": 0})
  ds = mixture.kind_dataset(
    F.IMAGE,
    [ListSource(make_records(F.IMAGE, 50))],
    sizes,
    _pre(),
    None,
    seed=0,
    make_example=fake_make_example,
    num_workers=2,
  )
  it = iter(ds)
  next(it)
  print("READY", flush=True)
  time.sleep(120)


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_jax_processes_read_disjoint_shards():
  port = _free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, __file__, "host", str(i), str(port)],
      cwd=ROOT,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=180))
  finally:  # only reached with live processes on a timeout or error: do not leak them
    for q in procs:
      if q.poll() is None:
        q.kill()
  results = []
  for p, (stdout, stderr) in zip(procs, outputs):
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"host failed:\n{stderr[-3000:]}"
    results.append(json.loads(lines[0][len("RESULT ") :]))
  assert sorted(r["process_index"] for r in results) == [0, 1]
  for key, n in (("image", N_IMAGE), ("region", N_REGION)):
    a, b = ({tuple(x) for x in r[key]} for r in results)
    if key == "image":  # region rows repeat a record (duplicate texts fill a short batch)
      assert len(a) == len(results[0][key]) and len(b) == len(results[1][key]), f"{key}: repeats"
    assert not a & b, f"{key}: shards overlap on {sorted(a & b)}"
    assert a | b == {(0, i) for i in range(n)}, f"{key}: union misses some records"
  shapes = results[0]["global_shapes"]
  assert shapes["image"]["pixels"] == [8, 16, 16, 3] and "record_id" not in shapes["image"]
  assert shapes["region"]["pixels"] == [4, 16, 16, 3] and shapes["region"]["box"] == [12, 4]
  for r in results:  # host p's image slots start at row 2p of the global pixels
    assert set(r["index_shift"]) == {2 * r["process_index"]}


def test_workers_exit_when_parent_is_killed():
  parent = subprocess.Popen(
    [sys.executable, __file__, "parent"],
    cwd=ROOT,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    line = parent.stdout.readline()
    assert line.strip() == "READY", parent.stderr.read()[-3000:]
    workers = [p for p in children(parent.pid) if "spawn_main" in _cmdline(p)]
    assert len(workers) >= 2, [(p, _cmdline(p)) for p in children(parent.pid)]
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in workers):
      time.sleep(0.2)
    left = [p for p in workers if alive(p)]
    for p in left:  # do not leak them into the rest of the test session
      os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} still running 10 s after the parent was killed"
  finally:
    if parent.poll() is None:
      parent.kill()


def _cmdline(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().replace(b"\0", b" ").decode()
  except OSError:
    return ""


if __name__ == "__main__":
  if sys.argv[1] == "host":
    _host(int(sys.argv[2]), int(sys.argv[3]))
  elif sys.argv[1] == "parent":
    _parent()
  else:
    raise SystemExit(f"unknown role {sys.argv[1]!r}")
