"""A run and an evaluation against a `gs://` workdir, through the same path layers a bucket
takes (tests/fake_gcs.py: fsspec's gcs protocol and orbax's TensorStore spec land in a local
folder), plus the error that names the `[gcs]` extra when no client is installed."""

import json
import os

import jax
import ml_collections as mlc
import numpy as np
import pytest
import tiny_launch
from fake_gcs import fake_gcs
from flax import nnx

from data_pipelines import synthetic
from x2vlm_jax import paths, sharding, train_lib
from x2vlm_jax import run_config as rc
from x2vlm_jax.evaluators import weights

URL = "gs://bkt/runs/tiny"


def _grounding_eval() -> mlc.ConfigDict:
  src = {"type": "synthetic", "size": 3, "seed": synthetic.HELDOUT_SEED, "world": {}}
  return mlc.ConfigDict(
    {
      "evaluators": ("grounding",),
      "batch_size": 8,
      "grounding": {"data": [src], "png_examples": 2},
    }
  )


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """Trains tiny for 2 steps into gs://bkt/runs/tiny (a checkpoint at 1 and 2, an evaluation
  with its PNG at 2, the export); yields the bucket's local folder with the fake still on."""
  root = tmp_path_factory.mktemp("bucket")
  cwd = tmp_path_factory.mktemp("cwd")
  mp = pytest.MonkeyPatch()
  old = os.getcwd()
  os.chdir(cwd)  # a `gs:` folder collapsed by pathlib would appear here
  try:
    with fake_gcs(str(root), mp):
      c = tiny_launch.config(
        tmp_path_factory, 2, ckpt_every=1, log_every=1, eval_every=2, export_at_end=True
      )
      c.eval = _grounding_eval()
      result = train_lib.train_and_evaluate(c, URL)
      yield root / "bkt/runs/tiny", result, c, cwd
  finally:
    os.chdir(old)
    mp.undo()


def test_run_writes_everything_into_the_bucket(bucket):
  run, result, _, cwd = bucket
  assert result.status == "done" and result.step == 2 and result.workdir == URL
  assert not list(cwd.iterdir()), "nothing may be written to a local 'gs:' folder"
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
  steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 2]  # training lines, then the evaluation's
  assert "finished (done) at step 2" in (run / "train.log").read_text()
  assert list(run.glob("events.out.tfevents.*")), "TensorBoard events"
  assert (run / "reports.txt").read_text().startswith("parameter overview")
  assert (run / "grounding_2.png").read_bytes()[:4] == b"\x89PNG"
  for name in ("params/model_config.json", "model.safetensors", "model.th"):
    assert (run / "export" / name).exists(), name


def test_eval_loads_from_the_bucket_read_only(bucket):
  """eval.py's loader on the gs:// run (its newest checkpoint) and on its gs:// export: the
  same parameters, and reading changes nothing in the bucket."""
  run, _, cfg, _ = bucket
  before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
  mesh = sharding.make_mesh(cfg.mesh.to_dict())
  model_cfg = rc.model_config(cfg)
  model, source = weights.load_model(model_cfg, mesh, checkpoint=URL)
  assert source == f"checkpoint {URL}/checkpoints step 2 (parameters only)"
  exported, source = weights.load_model(model_cfg, mesh, checkpoint=URL + "/export/params")
  assert source == f"params directory {URL}/export/params"
  a, b = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (model, exported))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_missing_client_names_the_extra(monkeypatch):
  monkeypatch.setattr(paths, "_client_available", lambda scheme, module: False)
  with pytest.raises(paths.MissingExtraError, match=r"pip install 'x2vlm-jax\[gcs\]'"):
    paths.path("gs://bucket/run")
  assert str(paths.path("/tmp/x")) == "/tmp/x" and not paths.is_remote("/tmp/gs://x")
