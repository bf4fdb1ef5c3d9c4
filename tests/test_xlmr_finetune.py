"""Multilingual retrieval end to end (docs/multilingual.md#retrieval): the tiny XLM-R model
fine-tuned from scratch on the synthetic shapes world in four languages (two non-Latin) through
the one training loop, evaluated per language by the English retrieval evaluator. One run is
shared by every assertion; the per-language splits, their mean and the configs are checked too.
"""

import json

import numpy as np
import pytest

from configs.finetune import retrieval_multilingual, tiny_multilingual
from data_pipelines import spm_tokenizer, synthetic_multilingual
from x2vlm_jax import run_config, train_lib
from x2vlm_jax.evaluators import retrieval

LANGS = ("en", "de", "zh", "ja")
pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("xlmr_ft")
  tok = spm_tokenizer.train_xlmr_tokenizer(
    synthetic_multilingual.caption_corpus(LANGS, max_shapes=1), root / "tok", 300
  )
  synthetic_multilingual.write_multilingual_retrieval(
    root / "data", LANGS, n_train=64, n_test=16, world={"max_shapes": 1}
  )
  c = tiny_multilingual.get_config(f"data={root / 'data'},tokenizer={tok},langs={'+'.join(LANGS)}")
  workdir = root / "run"
  result = train_lib.train_and_evaluate(c, workdir)
  metrics = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    metrics.setdefault(rec["step"], {}).update(rec["metrics"])
  return result, workdir, metrics


def test_every_language_retrieves_above_chance(run):
  result, workdir, metrics = run
  assert result.status == "done" and result.step == 400
  m = metrics[400]
  first = metrics[50]["train/loss/itc/image"]
  assert m["train/loss/itc/image"] < first
  for lang in LANGS:
    chance = m[f"eval/retrieval/{lang}/chance_r1"]
    assert chance == pytest.approx(100 / 16)
    for direction in ("txt_r1", "img_r1"):  # ITM re-ranked, the official metric
      got = m[f"eval/retrieval/{lang}/{direction}"]
      print(f"{lang} {direction}: {got:.1f} (chance {chance:.1f})")
      assert got > chance, (lang, direction, got, chance)
  for name in ("txt_r1", "img_r10", "r_mean"):
    want = np.mean([m[f"eval/retrieval/{lang}/{name}"] for lang in LANGS])
    assert m[f"eval/retrieval/mean/{name}"] == pytest.approx(want)
  best = json.loads((workdir / "best" / "best.json").read_text())
  assert best["step"] == 400 and best["metric"] == "eval/retrieval/mean/r_mean"


def test_mean_over_splits_errors():
  m = {"a/r1": 10.0, "a/seconds": 3.0, "b/r1": 30.0, "b/seconds": 1.0}
  assert retrieval.mean_over_splits(m, ["a", "b"], "mean") == {"mean/r1": 20.0}
  with pytest.raises(ValueError, match="differ"):
    retrieval.mean_over_splits({"a/r1": 1.0, "b/r5": 2.0}, ["a", "b"], "mean")


@pytest.mark.parametrize(
  "arg, langs, k",
  [("multi30k", ("cs", "de", "en", "fr"), 128), ("coco,large", ("en", "ja", "zh"), 256)],
)
def test_multilingual_configs(arg, langs, k):
  c = retrieval_multilingual.get_config(arg)
  mc = run_config.model_config(c)
  assert mc.text.kind == "xlmr" and mc.xvlm_plus and mc.vision.image_size == 384
  assert mc.text.depth == (24 if "large" in arg else 12)
  ev = run_config.eval_config(c.eval).retrieval
  assert (
    sorted(s for s, _ in ev.data) == sorted(langs) and ev.k_test == k and ev.mean_name == "mean"
  )
  assert c.train.select_metric == "eval/retrieval/mean/r_mean"
  assert len(c.data.image) == len(langs) and c.batch.image == 128 and c.optim.lr == 3e-5
  assert c.data.tokenizer.endswith("xlm-roberta-large" if "large" in arg else "xlm-roberta-base")
  with pytest.raises(ValueError, match="multi30k"):
    retrieval_multilingual.get_config("flickr")
