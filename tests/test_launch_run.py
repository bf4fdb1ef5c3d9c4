"""One tiny launch, checked the way a user on a pod meets it (one run, so one compile):

* cloud paths: the run, its evaluation and export, and eval.py's loader against a `gs://`
  workdir, through the same path layers a bucket takes (tests/fake_gcs.py: fsspec's gcs
  protocol and orbax's TensorStore spec land in a local folder); the error naming the `[gcs]`
  extra when no client is installed;
* an honest progress line: the ETA after the compile window is the steady step time times the
  steps left, and within 50 % of the time that really remained (unit tests of the estimator:
  test_progress_eta.py).
"""

import json
import os
import shutil
import time

import ml_collections as mlc
import numpy as np
import pytest
from fake_gcs import fake_gcs
from flax import nnx

from configs import tiny
from data_pipelines import fileio, synthetic
from x2vlm_jax import metrics_writer as mw
from x2vlm_jax import paths, sharding, train_lib
from x2vlm_jax import run_config as rc
from x2vlm_jax.evaluators import weights

URL = "gs://bkt/runs/tiny"
STEPS = 64  # progress lines every 8 steps


def _grounding_eval() -> mlc.ConfigDict:
  src = {"type": "synthetic", "size": 3, "seed": synthetic.HELDOUT_SEED, "world": {}}
  return mlc.ConfigDict(
    {
      "evaluators": ("grounding",),
      "batch_size": 8,
      "grounding": {"data": [src], "png_examples": 2},
    }
  )


def _config():
  c = tiny.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2  # the 8 simulated devices
  c.batch.region_max_images = 4  # divisible by the 4 batch shards
  c.train.fast_compile = True  # the cheap CPU step options: nothing here times the step itself
  c.train.total_steps, c.train.log_every, c.train.ckpt_every = STEPS, 8, 1000  # saves at the end
  c.train.eval_every, c.train.export_at_end = STEPS, True
  c.eval = _grounding_eval()
  return c


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
  """Tiny for 64 steps into gs://bkt/runs/tiny (progress lines every 8 steps, a checkpoint, an
  evaluation with its PNG and the export at 64). Yields the bucket's local folder with the fake
  still on, the result, the config, the working directory and (step, time, ETA) of every line."""
  root = tmp_path_factory.mktemp("bucket")
  cwd = tmp_path_factory.mktemp("cwd")
  lines, real = [], mw.format_progress

  def spy(step, total, metrics=None, **kw):
    lines.append((step, time.monotonic(), kw.get("eta_seconds")))
    return real(step, total, metrics, **kw)

  mp = pytest.MonkeyPatch()
  mp.setattr(mw, "format_progress", spy)
  old = os.getcwd()
  os.chdir(cwd)  # a `gs:` folder collapsed by pathlib would appear here
  try:
    with fake_gcs(str(root), mp):
      c = _config()
      result = train_lib.train_and_evaluate(c, URL)
      yield root / "bkt/runs/tiny", result, c, cwd, lines
  finally:
    os.chdir(old)
    mp.undo()


def test_run_writes_everything_into_the_bucket(launched):
  run, result, _, cwd, _ = launched
  assert result.status == "done" and result.step == STEPS and result.workdir == URL
  assert not list(cwd.iterdir()), "nothing may be written to a local 'gs:' folder"
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [str(STEPS)]
  steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert steps == [*range(8, STEPS + 1, 8), STEPS]  # training lines, then the evaluation's
  assert f"finished (done) at step {STEPS}" in (run / "train.log").read_text()
  assert list(run.glob("events.out.tfevents.*")), "TensorBoard events"
  assert (run / "reports.txt").read_text().startswith("parameter overview")
  assert (run / f"grounding_{STEPS}.png").read_bytes()[:4] == b"\x89PNG"
  for name in ("params/model_config.json", "model.safetensors", "model.th"):
    assert (run / "export" / name).exists(), name


def test_eval_loads_from_the_bucket_read_only(launched):
  """eval.py's loader on the gs:// run (its newest checkpoint): the trained parameters, and
  reading changes nothing in the bucket (read-only: no temporary-directory clean-up)."""
  run, _, cfg, _, _ = launched
  before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
  mesh = sharding.make_mesh(cfg.mesh.to_dict())
  model, source = weights.load_model(rc.model_config(cfg), mesh, checkpoint=URL)
  assert source == f"checkpoint {URL}/checkpoints step {STEPS} (parameters only)"
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert params["vision"]["patch_embed"]["kernel"].shape[:3] == (16, 16, 3)
  assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_eta_after_compile_is_honest(launched):
  """After the compile window (steps 1-8), the ETA of step 32 is the remaining 32 steps at the
  steady step time that the lines themselves show (steps 8-32, within 10 %), and it predicts the
  time that really remained within 50 %. The second bound is loose on purpose: the other pytest
  worker shares the 2 cores and speeds up or slows down the rest of the run when it starts or
  ends a compile (a 20 % bound failed once on CI-like load: ETA 17.3 s, real 14.4 s). Before this
  estimator the ETA at this point included the compile (5x too long); exact estimator behaviour
  is unit-tested in test_progress_eta.py."""
  *_, lines = launched
  assert [s for s, _, _ in lines] == list(range(8, STEPS + 1, 8))
  t_end = lines[-1][1]
  for step, t, eta in lines[:4]:
    print(f"ETA at step {step}: {eta:.2f} s, real remaining {t_end - t:.2f} s")
  (_, t8, _), (_, t32, eta32) = lines[0], lines[3]
  steady = (STEPS - 32) * (t32 - t8) / (32 - 8)
  assert eta32 == pytest.approx(steady, rel=0.1)
  assert eta32 == pytest.approx(t_end - t32, rel=0.5)


def test_missing_client_names_the_extra(monkeypatch):
  monkeypatch.setattr(fileio, "_client_available", lambda scheme, module: False)
  with pytest.raises(paths.MissingExtraError, match=r"pip install 'x2vlm-jax\[gcs\]'"):
    paths.path("gs://bucket/run")
  assert str(paths.path("/tmp/x")) == "/tmp/x" and not paths.is_remote("/tmp/gs://x")


def test_jsonl_source_reads_from_the_bucket(tmp_path, monkeypatch):
  """A data source given as gs://... (lines and the image files they name) reads the same
  records as its local copy."""
  from data_pipelines import features as F
  from data_pipelines.jsonl_format import default_format
  from data_pipelines.sources import JsonLinesSource

  world = synthetic.ShapesWorld(synthetic.WorldConfig(image_size=32))
  local = tmp_path / "local"
  synthetic.write_jsonl(world, F.IMAGE, 5, local, n_files=2, rpath=True)
  fmt = default_format(F.IMAGE, is_image_rpath=True)
  with fake_gcs(str(tmp_path / "bucket"), monkeypatch) as root:
    shutil.copytree(local, f"{root}/bkt/data")
    remote = JsonLinesSource("gs://bkt/data", F.IMAGE, fmt)
    assert remote.files[0].startswith("gs://bkt/data/") and len(remote) == 5
    expected = JsonLinesSource(str(local), F.IMAGE, fmt)
    for i in range(5):
      a, b = remote[i], expected[i]
      assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), i


def test_logdir_continues_and_uploads_remote_logs(tmp_path, monkeypatch):
  """A resumed run on a bucket continues its logs: they are copied down first, written locally
  (object stores cannot append) and copied up whole by sync()."""
  with fake_gcs(str(tmp_path / "bucket"), monkeypatch) as root:
    work = paths.path("gs://bkt/run")
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.log").write_text("old line\n")
    logs = paths.LogDir(work, ("train.log", "metrics.jsonl"))  # no metrics.jsonl yet: skipped
    assert logs.remote and not str(logs.local).startswith(root)
    with open(logs.local / "train.log", "a") as f:
      f.write("new line\n")
    (logs.local / "tb").mkdir()
    (logs.local / "tb" / "events.1").write_bytes(b"\x00\x01")
    logs.sync()
    assert (work / "train.log").read_text() == "old line\nnew line\n"
    assert (work / "tb" / "events.1").read_bytes() == b"\x00\x01"
    logs.close()
    assert not logs.local.exists()
  local = paths.LogDir(paths.path(tmp_path / "here"))
  assert not local.remote and local.local == tmp_path / "here" and local.local.is_dir()


def test_fake_bucket_is_gone_after_its_context(tmp_path, monkeypatch):
  import fsspec

  before = dict(fsspec.registry)  # (the module's run may hold its own fake open)
  with fake_gcs(str(tmp_path), monkeypatch):
    assert fsspec.registry["gs"] is not before.get("gs")
  assert dict(fsspec.registry) == before  # later tests meet what was there (no client: none)


def test_s3_workdir_refused_before_anything_is_written(monkeypatch):
  """s3:// serves data sources; orbax cannot write checkpoints there: say so at once."""
  monkeypatch.setattr(fileio, "_client_available", lambda scheme, module: True)
  with pytest.raises(ValueError, match="local folder or gs:// only"):
    train_lib.train_and_evaluate(tiny.get_config(), "s3://bucket/run")
