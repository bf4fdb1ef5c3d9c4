"""The demo's CI variant end to end: JSON-lines data -> train.py -> eval.py -> summary.

Runs `python -m x2vlm_jax.demo --ci` in a subprocess (exactly what `make demo` runs, with fewer
steps and smaller held-out sets) and checks that the model really learned: the logged losses
fall, held-out text->image R@1 is well above chance, and the PNG of boxes was written.

Then the fine-tuning demo's CI variant starts from that run: fine-tuned on synthetic retrieval and
captioning in the official formats and evaluated on held-out images before and after,
fine-tuning must beat the pre-trained model (retrieval mean recall, the metric the retrieval
configs select on; captioning BLEU-4). Both live in this
one file so that the suite's parallel runner (`--dist loadfile`) runs the demo once.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def summary(demo_ci):
  return demo_ci


def test_losses_fall(summary):
  # (first, last) of the values logged every 10 steps; measured 32.9 -> 17.7 and 2.14 -> 1.33.
  losses = summary["losses"]
  first, last = losses["train/loss/total"]
  assert last < 0.7 * first, (first, last)
  first, last = losses["train/loss/itc/image"]  # ln(12) = 2.48 at chance
  assert last < 0.8 * first, (first, last)


def test_retrieval_above_chance(summary):
  m = summary["metrics"]
  n = m["eval/retrieval/num_images"]
  chance = m["eval/retrieval/chance_r1"]
  assert n == 50 and m["eval/retrieval/num_texts"] == 100 and chance == pytest.approx(2.0)
  # Text -> image R@1 ranked by the ITC similarity (measured 16 %) against 2 % for a random
  # ranking; 4x chance is > 4 standard deviations of a random ranker's R@1 over 100 captions.
  assert m["eval/retrieval_itc/img_r1"] >= 4 * chance, m
  # The official ITM re-ranking with a 60-step ITM head: R@10 (measured 63 %) against 20 % for
  # a random ranking.
  assert m["eval/retrieval/img_r10"] >= 2 * (100.0 * 10 / n), m


def test_grounding_reported_and_png_written(summary):
  m = summary["metrics"]
  assert m["eval/grounding/count"] > 30
  assert 0.0 <= m["eval/grounding/acc_whole_image"] < 10.0  # shapes are small: baseline ~0
  assert m["eval/grounding/mean_iou"] > 0.0
  png = summary["_work"] / "grounding.png"
  assert png.exists() and png.stat().st_size > 1000
  assert "text->image  R@1/5/10" in summary["_stdout"]


def test_fine_tuning_beats_the_pretrained_model(demo_ci, tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # as the demo runs on a user's machine (see tests/conftest.py)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "x2vlm_jax.finetune_demo",
      "--ci",
      "--tasks=retrieval,caption",
      f"--pretrained={demo_ci['_work'] / 'run'}",
      f"--workdir={tmp_path}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1500,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  res = summary["retrieval"]
  zero, tuned = res["zero_shot"], res["fine_tuned"]
  key = "eval/retrieval/test/r_mean"
  print(
    f"retrieval mean recall: zero-shot {zero[key]:.1f} -> fine-tuned {tuned[key]:.1f}; "
    f"R@1 t->i {zero['eval/retrieval/test/img_r1']:.1f} -> "
    f"{tuned['eval/retrieval/test/img_r1']:.1f}; {res['seconds']}"
  )
  assert tuned[key] > zero[key] + 2.0, (zero[key], tuned[key])
  first, last = res["losses"]["train/loss/total"]
  assert last < first
  assert "retrieval: zero-shot -> fine-tuned" in proc.stdout
  # Captioning (40 steps of the official objective, beam 3): held-out BLEU-4 must beat the
  # pre-trained model's (measured 0.0 -> 11.9 on 20 test images; CIDEr-D 33.1 -> 92.7).
  cap = summary["caption"]
  zero, tuned = cap["zero_shot"], cap["fine_tuned"]
  bleu4, cider = "eval/caption/test/bleu_4", "eval/caption/test/cider"
  print(
    f"caption BLEU-4 {zero[bleu4]:.1f} -> {tuned[bleu4]:.1f}, CIDEr {zero[cider]:.1f} -> "
    f"{tuned[cider]:.1f}; {cap['seconds']}"
  )
  assert tuned[bleu4] > zero[bleu4] + 2.0, (zero[bleu4], tuned[bleu4])
  assert tuned[cider] > zero[cider], (zero[cider], tuned[cider])
