"""Tests of the evaluation glue: evaluation sets from records, the jitted scorers against the
model called directly, mesh vs single device, config errors, and the grounding PNG."""

import jax
import numpy as np
import pytest
from PIL import Image

from data_pipelines import synthetic
from data_pipelines.text_ops import Tokenizer, pre_caption
from x2vlm_jax import assets, sharding
from x2vlm_jax import run_config as rc
from x2vlm_jax.evaluators import eval_data, retrieval, run, visualize
from x2vlm_jax.models import x2vlm
from x2vlm_jax.models.config import ModelConfig

L = 24
WORLD = {"image_size": 48}


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer(assets.minilm_dir(), L)


@pytest.fixture(scope="module")
def model():
  return x2vlm.create_sharded(
    ModelConfig.tiny(), sharding.make_mesh({"data": -1}), jax.random.key(3, impl="unsafe_rbg")
  )


def _cfg(**kw):
  src = lambda kind, n: [
    {"type": "synthetic", "size": n, "seed": synthetic.HELDOUT_SEED, "world": WORLD}
  ]
  cfg = {
    "evaluators": ("retrieval", "grounding"),
    "batch_size": 8,
    "retrieval": {"data": src("image", 10), "k_test": 4, "itm_chunk": 8},
    "grounding": {"data": src("region", 5), "png_examples": 3},
  }
  cfg.update(kw)
  return cfg


def test_retrieval_set_groups_images_and_counts_skips(tokenizer):
  world = synthetic.ShapesWorld(synthetic.WorldConfig(**WORLD))
  a, b = world.record("image", 0), world.record("image", 1)
  # The same image twice (one line per caption, as pre-training files hold it), a caption that
  # cleans to nothing, and a corrupt image.
  records = [
    dict(a, captions=a["captions"][:1]),
    b,
    dict(a, id="dup", captions=a["captions"][1:]),
    dict(b, id="x", image=b"not a png", captions=["a red circle"]),
    dict(b, id="y", image=world.record("image", 2)["image"], captions=["  ?! "]),
  ]
  data = eval_data.retrieval_set([records], tokenizer, 64)
  assert data.pixels.shape == (2, 64, 64, 3) and data.ids.shape == (4, L)
  assert data.image_ids == [a["id"], b["id"]]
  assert data.img2txt == [[0, 3], [1, 2]] and data.txt2img.tolist() == [0, 1, 1, 0]
  assert data.captions[3] == pre_caption(a["captions"][1], L)
  # corrupt image; record y loses its only caption, so its image is dropped too.
  assert data.skips == {"corrupt_image": 1, "empty_caption": 2}
  assert eval_data.retrieval_set([records], tokenizer, 64, max_images=1).img2txt == [[0, 1]]


def test_grounding_set_phrases_and_pixel_boxes(tokenizer):
  world = synthetic.ShapesWorld(synthetic.WorldConfig(**WORLD))
  rec = world.record("region", 0)
  bad = dict(rec, id="bad", elems=[{"bb": [40, 40, 30, 30], "captions": ["square"]}])
  data = eval_data.grounding_set([[rec, bad]], tokenizer, 64)
  n = len(rec["elems"])
  assert len(data.phrases) == n and data.skips == {"bad_box": 1}
  np.testing.assert_array_equal(data.gt_boxes, [e["bb"] for e in rec["elems"]])
  np.testing.assert_array_equal(data.image_wh, [[48, 48]] * n)
  assert data.image_index.tolist() == [0] * n and data.pixels.shape == (1, 64, 64, 3)
  first = rec["elems"][0]
  assert data.phrases[0] == f"{first['attributes'][0]} {first['captions'][0]}"


def test_scorers_match_the_model_and_full_rerank(model, tokenizer):
  cfg = _cfg()
  fns = run._Fns(model, None)
  data = eval_data.retrieval_set(run._sources("image", cfg["retrieval"]["data"]), tokenizer, 64)
  ni, nt = len(data.img2txt), len(data.captions)
  # Direct model calls, no batching or padding.
  tokens = model.encode_image(data.pixels)
  text = model.encode_text(data.ids, data.mask)
  v, t = model.itc_features(tokens, text)
  rows = np.repeat(np.arange(ni), nt)
  cols = np.tile(np.arange(nt), ni)
  fused = model.fuse(
    text[cols], data.mask[cols], tokens[rows], np.ones((ni * nt, tokens.shape[1]), np.int32)
  )
  itm = np.asarray(model.itm_logits(fused)[:, 1]).reshape(ni, nt)
  # k_test >= every list length: every pair is re-ranked, so the metrics are those of the full
  # ITM matrix; batch 8 and chunk 8 exercise padding of the last batch/chunk.
  got = run.run_retrieval(fns, data, batch=8, k_test=nt, itm_chunk=8, prefix="r")
  want = retrieval.retrieval_metrics(itm, itm.T, data.txt2img, data.img2txt, prefix="r")
  for k, val in want.items():
    assert got[k] == pytest.approx(val), k
  # Without room for the precomputed K/V, every chunk projects them itself: same metrics.
  per_chunk = run.run_retrieval(fns, data, 8, nt, 8, prefix="r", kv_bytes_limit=0)
  assert per_chunk == pytest.approx(got)
  want_itc = retrieval.evaluate_retrieval_itc(v, t, data.txt2img, data.img2txt, prefix="r_itc")
  for k, val in want_itc.items():
    assert got[k] == pytest.approx(val), k
  assert got["r/chance_r1"] == pytest.approx(100 / ni)

  g = eval_data.grounding_set(run._sources("region", cfg["grounding"]["data"]), tokenizer, 64)
  img = model.encode_image(g.pixels)[g.image_index]
  txt = model.encode_text(g.ids, g.mask)
  want_boxes = model.box(model.fuse(txt, g.mask, img, np.ones(img.shape[:2], np.int32)))
  np.testing.assert_allclose(run.predict_boxes(fns, g, 8), want_boxes, atol=2e-5)


def test_evaluate_on_mesh_equals_single_device(model, tokenizer, tmp_path):
  png = tmp_path / "boxes.png"
  single = run.evaluate(model, rc.eval_config(_cfg()), tokenizer, None, log=None)
  mesh = sharding.make_mesh({"data": -1})
  sharded = run.evaluate(
    model, rc.eval_config(_cfg()), tokenizer, mesh, step=7, png_path=str(png), log=None
  )
  names = {f"eval/retrieval/{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)}
  names |= {"eval/grounding/acc", "eval/grounding/acc_whole_image", "eval/retrieval/r_mean"}
  assert names <= set(single)
  for k, val in single.items():
    if not k.endswith("seconds"):
      assert sharded[k] == pytest.approx(val, abs=1e-4), k
  assert single["eval/retrieval/num_images"] == 10
  img = Image.open(png)
  assert img.format == "PNG" and img.width > 3 * 256
  line = run.format_metrics(single)
  assert "text->image R@1/5/10" in line and "whole image" in line and "mean box" in line


def test_bad_config_is_named(model, tokenizer):
  with pytest.raises(ValueError, match="unknown.*'retrevial'"):
    rc.eval_config(_cfg(evaluators=("retrevial",)))
  data = _cfg()["grounding"]["data"]
  with pytest.raises(ValueError, match=r"eval.grounding: unknown keys \['k_test'\]"):
    rc.eval_config(_cfg(evaluators=("grounding",), grounding={"data": data, "k_test": 3}))
  with pytest.raises(ValueError, match="eval.retrieval.data: no sources"):
    rc.eval_config(_cfg(evaluators=("retrieval",), retrieval={"k_test": 3}))
  assert run.evaluate(model, rc.eval_config(_cfg(evaluators=())), tokenizer, log=None) == {}


def test_png_marks_both_boxes(tokenizer, tmp_path):
  world = synthetic.ShapesWorld(synthetic.WorldConfig(**WORLD))
  data = eval_data.grounding_set([[world.record("region", i) for i in range(4)]], tokenizer, 64)
  pred = np.tile([[0.5, 0.5, 0.5, 0.5]], (len(data.phrases), 1)).astype(np.float32)
  path = visualize.write_grounding_png(str(tmp_path / "sub" / "g.png"), data, pred, n=3)
  pixels = np.asarray(Image.open(path).convert("RGB"))
  assert (pixels == visualize.TRUE_COLOUR).all(-1).sum() > 100
  assert (pixels == visualize.PRED_COLOUR).all(-1).sum() > 100


def test_load_model_from_params_dir(model, tmp_path):
  from flax import nnx

  from configs import tiny
  from x2vlm_jax import params_io
  from x2vlm_jax.evaluators import weights

  cfg = rc.model_config(tiny.get_config())
  mesh = sharding.make_mesh({"data": -1})
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params_io.save_params(tmp_path / "params", model.cfg, params)
  loaded, where = weights.load_model(cfg, mesh, checkpoint=str(tmp_path / "params"))
  assert "params directory" in where
  got = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, got, params)
  with pytest.raises(ValueError, match="exactly one of --checkpoint"):
    weights.load_model(cfg, mesh)
  with pytest.raises(FileNotFoundError, match="neither a params directory"):
    weights.load_model(cfg, mesh, checkpoint=str(tmp_path))


def test_eval_py_without_evaluators_exits_2(tmp_path):
  """eval.py never succeeds silently: no evaluator configured is an error before any read."""
  import os
  import pathlib
  import subprocess
  import sys

  repo = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run(
    [
      sys.executable,
      str(repo / "eval.py"),
      f"--config={repo / 'configs/tiny.py'}",
      f"--checkpoint={tmp_path}",
    ],
    cwd=repo,
    env=dict(os.environ, PYTHONPATH=str(repo)),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "runs no evaluator" in proc.stderr and "config.eval.evaluators" in proc.stderr
